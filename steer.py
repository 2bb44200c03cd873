"""
Run the language model with a trained SAE in the loop: measure how much of the model it keeps, see
what each latent means, and steer generation by pushing one latent. Everything comes from the
SAE's path (the model, the layer, the capture).
$ python steer.py                                       # evaluate out/smollm2-l15, its dashboard
$ python steer.py --eval=True --data=my.txt             # loss recovered, delta CE, KL on other text
$ python steer.py --prompt="The Eiffel Tower is in"     # the latents that fire most on each token
$ python steer.py --prompt="My favourite food is" --latent=123 --strength=4 --mode=add   # steer
"""
import os, sys, json, math, time, shlex
from collections import Counter
# before torch loads tqdm: no progress bars or hub retry noise, so a user mistake stays one line
os.environ.update({'TQDM_DISABLE': '1', 'HF_HUB_VERBOSITY': 'error', **os.environ})
import numpy as np
import torch
import torch.nn.functional as F
from sae import configure, pick_device, write_file, check_capture, load_sae, read_rows
from capture import load_model, blocks, read_docs, contexts, pad, run_to_layer

# -----------------------------------------------------------------------------
# config: defaults, override with --key=value
sae_path = 'out/smollm2-l15'  # a folder written by sae.py
eval = False             # evaluate: CE clean / spliced / ablated, loss recovered, KL -> eval.json
browse = False           # write the dashboard: browser.html and browser.json
data = ''                # eval text (.txt, folder of .txt, .jsonl); '': the held-out articles
eval_tokens = 20_000     # tokens of eval text
prompt = ''              # inspect (alone) or steer (with --latent)
latent = -1              # the latent to steer
strength = 4.0           # add: multiples of the latent's mean activation; clamp: the value
mode = 'add'             # 'add', 'clamp' or 'ablate'
max_new_tokens = 40
temperature = 0.7        # 0: greedy
seed = 1337              # the clean and the steered completion sample with the same seed
top_latents = 5          # latents shown per token with --prompt
browse_latents = 0       # live latents in the dashboard, lowest index first (0: all)
n_examples = 8           # top-activating examples per latent (plus 2 per quintile)
batch_size = 8           # contexts per forward pass
device = 'cpu'           # 'cpu', 'cuda' or 'cuda:N'
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# the valid values of each key (sae.configure checks them); latent is checked against the SAE
rules = {'eval_tokens': 'v >= 1', 'latent': 'v >= -1', 'mode': ('add', 'clamp', 'ablate'),
         'max_new_tokens': 'v >= 1', 'temperature': 'v >= 0', 'seed': 'v >= 0',
         'top_latents': 'v >= 1', 'browse_latents': 'v >= 0', 'n_examples': 'v >= 1',
         'batch_size': 'v >= 1'}
# -----------------------------------------------------------------------------

# Hook `block` so its output h (B, T, d) becomes fn(h) at every position but the first `skip` of a
# prompt, which the SAE never saw (capture excluded them). A step with the KV cache (T == 1) is
# always changed: one peer's tutorial skips it, so it never steers generated tokens.
def attach(block, fn, skip=1):
    def hook(mod, args, output):
        # a block returns a Tensor or a tuple whose first item is the hidden state
        h = output[0] if isinstance(output, tuple) else output
        # a prompt (T > 1) keeps its first positions; a cached step (T == 1) is a new token
        lo = skip if h.shape[1] > 1 else 0
        h = torch.cat([h[:, :lo], fn(h[:, lo:])], 1)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    return block.register_forward_hook(hook)

# h -> the SAE's reconstruction (plus the SAE's error term h - recon, which gives h back: a check
# that the splice itself changes nothing).
def sae_fn(sae, error=False):
    def fn(h):
        # the SAE works in float32 on (rows, d); the model may run in bf16
        r = sae(h.reshape(-1, h.shape[-1]).float()).view_as(h).to(h.dtype)
        return r + (h - r) if error else r
    return fn

# add: h + value * d_i; clamp: h + (value - f_i(h)) * d_i, which keeps the SAE's error term
# (replacing h by the reconstruction would add the error to every steered run); ablate: clamp 0.
def steer_fn(sae, i, value, mode):
    d_i = sae.W_dec[i]

    def fn(h):
        if mode == 'add':
            return h + value * d_i
        # f_i(h): latent i's activation, 0 where it is not in the top k
        vals, idx = sae.encode(h.reshape(-1, h.shape[-1]).float())
        f_i = (vals * (idx == i)).sum(-1).view(*h.shape[:-1], 1).to(h.dtype)
        return h + ((value if mode == 'clamp' else 0) - f_i) * d_i
    return fn

# Next-token CE (nats) clean, with the SAE spliced in, spliced plus its error term, zero- and mean-
# ablated at the layer; loss recovered and KL(clean || spliced). Only positions >= skip are changed
# and scored.
@torch.no_grad()
def evaluate_lm(lm, block, sae, ctxs, skip, bs, device):
    # the mean activation over real tokens at positions >= skip, for mean ablation
    tot, cnt = 0, 0
    for j in range(0, len(ctxs), bs):
        ids, mask = pad(ctxs[j:j + bs], device)
        m = mask[:, skip:, None]
        h = run_to_layer(lm, block, ids, mask)[:, skip:]
        tot, cnt = tot + (h * m).sum((0, 1)), cnt + m.sum()
    # mean ablation: every changed position gets this one vector
    mean = tot / cnt
    # each mode is a function of the block's output; None runs the clean model
    modes = {'clean': None, 'spliced': sae_fn(sae), 'spliced+error': sae_fn(sae, error=True),
             'zero_ablated': torch.zeros_like, 'mean_ablated': lambda h: mean.expand_as(h)}
    # sums over tokens, divided by the token count at the end
    ce, kl, n = dict.fromkeys(modes, 0.0), 0.0, 0
    for j in range(0, len(ctxs), bs):
        ids, mask = pad(ctxs[j:j + bs], device)
        # predictions from positions >= skip, of real tokens
        tgt = mask[:, skip + 1:].bool()
        for name, fn in modes.items():
            # one forward per mode, the hook removed before the next
            handle = attach(block, fn, skip) if fn else None
            logits = lm(input_ids=ids, attention_mask=mask).logits
            logp = F.log_softmax(logits[:, skip:-1].float(), -1)[tgt]
            if handle:
                handle.remove()
            # the log-probability of each real next token
            ce[name] += -logp.gather(1, ids[:, skip + 1:][tgt][:, None]).sum().item()
            # KL(clean || spliced) per token: sum p_clean (log p_clean - log p_spliced)
            if name == 'clean':
                clean = logp
            if name == 'spliced':
                kl += (clean.exp() * (clean - logp)).sum().item()
        n += int(tgt.sum())
    # mean CE per scored token, for each mode
    r = {f'ce_{m}': v / n for m, v in ce.items()}
    # the share of the CE gap to ablation that the SAE closes (100: as good as the clean model)
    zero, mean_ab = r['ce_zero_ablated'], r['ce_mean_ablated']
    r['loss_recovered_pct'] = 100 * (zero - r['ce_spliced']) / (zero - r['ce_clean'])
    r['loss_recovered_vs_mean_pct'] = 100 * (mean_ab - r['ce_spliced']) / (mean_ab - r['ce_clean'])
    return {**r, 'delta_ce': r['ce_spliced'] - r['ce_clean'], 'kl': kl / n, 'tokens': n}

# the window shown around a firing token: 8 tokens before it and 3 after (SAE-Vis shows 5 and 5;
# a little more left context reads better)
BEFORE, AFTER = 8, 3
# a latent's activation histogram: log2 bins, 4 per octave from 2^-10 up (the last bin also takes
# everything above 2^14); fixed bins are what lets one pass count them
N_BINS = 96

# Keep, per latent, the m candidates with the largest keys: sort the candidates by latent, then by
# key (a stable sort by latent keeps the key order within each), and take the first m of each
# latent. Every latent has m candidates at least (the table's own slots), so the result is (n, m):
# indices into the candidates, largest key first.
def keep_largest(key, lat, n, m):
    o = key.argsort(descending=True)
    o = o[lat[o].argsort(stable=True)]
    lo = lat[o]
    # each candidate's rank within its latent
    rank = torch.arange(len(o)) - torch.searchsorted(lo, torch.arange(n))[lo]
    return o[rank < m].view(n, m)

# One pass over the capture, a chunk of rows at a time. Per latent: how many rows it fires on, a
# histogram of those activations, its E largest activations and a uniform random sample of R of
# them (each firing gets a random key and the R largest keys stay: a bottom-k sketch), each with
# the latent's activations on the window of rows around it. The windows come from the chunk's own
# codes, encoded with a margin of BEFORE and AFTER rows, so that no row is read twice.
@torch.no_grad()
def scan(sae, acts, E, R, chunk=8192):
    # count: rows each latent fires on; hist: its activations in N_BINS bins, one flat tensor
    N, n = np.load(acts, mmap_mode='r').shape[0], sae.W_dec.shape[0]
    count, hist = torch.zeros(n, dtype=torch.long), torch.zeros(n * N_BINS, dtype=torch.long)
    # the sample's random keys come from a fixed seed: the same capture gives the same page
    g = torch.Generator().manual_seed(0)
    # two tables of (keys, rows, windows): the top activations and the random sample; an empty
    # slot has the key -inf
    tables = [[torch.full((n, m), -math.inf), torch.zeros(n, m, dtype=torch.long),
               torch.zeros(n, m, BEFORE + 1 + AFTER)] for m in (E, R)]
    # a window's rows relative to its firing row
    offsets = torch.arange(-BEFORE, AFTER + 1)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        # the chunk with its margins: windows at the chunk's edges need their neighbours
        lo, hi = max(0, s - BEFORE), min(N, e + AFTER)
        vals, idx = sae.encode(read_rows(acts, np.arange(lo, hi)))
        # the chunk's own rows, as (value, latent, row) triples
        v, lat = vals[s - lo:e - lo].flatten(), idx[s - lo:e - lo].flatten()
        rows = torch.arange(s, e).repeat_interleave(idx.shape[1])
        # top-k keeps k entries per row, but ReLU may have zeroed some: those did not fire
        fired = v > 0
        count.index_add_(0, lat[fired], torch.ones_like(lat[fired]))
        # log2 bins (4 per octave) from 2^-10; anything smaller goes in the first bin
        bins = ((v[fired].log2() + 10) * 4).floor().clamp(0, N_BINS - 1).long()
        hist.index_add_(0, lat[fired] * N_BINS + bins, torch.ones_like(bins))
        # the triples' keys in each table: the value, or a random number; -inf where not fired
        for table, new in zip(tables, (v, torch.rand(len(v), generator=g))):
            key, row, win = table
            # the table's slots and this chunk's triples, as one list of candidates
            m = key.shape[1]
            cand_key = torch.cat([key.flatten(), new.masked_fill(~fired, -math.inf)])
            cand_lat = torch.cat([torch.arange(n).repeat_interleave(m), lat])
            cand_row = torch.cat([row.flatten(), rows])
            sel = keep_largest(cand_key, cand_lat, n, m)
            # windows: kept entries bring theirs; a new entry's come from this chunk's codes
            is_new = sel >= n * m
            w = win.flatten(0, 1)[sel.clamp(max=n * m - 1)]
            q = (cand_row[sel[is_new]][:, None] + offsets).clamp(lo, hi - 1) - lo  # (M, 12)
            hit = idx[q] == cand_lat[sel[is_new]][:, None, None]  # (M, 12, k)
            w[is_new] = (vals[q] * hit).sum(-1)
            # the table for the next chunk
            table[:] = cand_key[sel], cand_row[sel], w
    return count, hist.view(n, N_BINS), tables

# The window around each row of rs, within its context (and with the context's token 0 when the
# capture did not store it): (token ids, the latent's activations, the row's place) per row.
def windows(rs, wins, cap):
    tokens, ctx, pos, first = (cap[f] for f in ('tokens', 'ctx', 'pos', 'first'))
    # rows around each row, clipped to the capture; those of other contexts are dropped
    q = (rs[:, None] + np.arange(-BEFORE, AFTER + 1)).clip(0, len(ctx) - 1)
    inside = (np.abs(q - rs[:, None]) <= BEFORE) & (ctx[q] == ctx[rs][:, None])
    out = []
    for j, r in enumerate(rs):
        rows = q[j][inside[j]]
        ids, acts = tokens[rows].tolist(), wins[j][inside[j]].tolist()
        at = int(inside[j][:BEFORE].sum())
        # the window reaches the start of a context whose token 0 is not a row
        if pos[rows[0]] == 1:
            ids, acts, at = [int(first[ctx[r]])] + ids, [0.0] + acts, at + 1
        out.append((ids, acts, at))
    return out

# Each decoder row through the final norm and the unembedding: the 8 tokens it promotes and the 8
# it suppresses most, 512 latents at a time (all at once would be a (9216, 49152) table).
def logit_effects(lm, sae, live):
    base = lm.get_submodule(blocks(lm)[0].rsplit('.', 1)[0])
    norm = next(getattr(base, a) for a in ('norm', 'ln_f', 'final_layernorm') if hasattr(base, a))
    up, down = [], []
    for j in range(0, len(live), 512):
        logits = lm.get_output_embeddings()(norm(sae.W_dec[live[j:j + 512]][None]))[0]
        up += logits.topk(8, -1).indices.tolist()
        down += (-logits).topk(8, -1).indices.tolist()
    return up, down

# The overview's numbers: the evaluation (training's held-out FVU, L0 and dead fraction, then
# eval.json's when steer.py has evaluated) and the training curves from metrics.jsonl.
def training_record(info, folder):
    evals = dict(info.get('eval', {}))
    if os.path.exists(os.path.join(folder, 'eval.json')):
        evals.update(json.load(open(os.path.join(folder, 'eval.json'))))
    logged = []
    if os.path.exists(os.path.join(folder, 'metrics.jsonl')):
        logged = [json.loads(line) for line in open(os.path.join(folder, 'metrics.jsonl'))]
    # the log lines (not the eval ones) carry the batch FVU and the dead share
    curves = {key: [r[key] for r in logged if 'fvu' in r] for key in ('tokens', 'fvu', 'dead_pct')}
    return {'eval': evals, 'curves': curves}

# Write the dashboard beside the SAE: browser.html (one static page, open from disk) and the same
# data as browser.json for programs. Every live latent: density, activation histogram, top and
# per-quantile examples, logit effects; and the SAE's overview (config, evaluation, training
# curves, densities). Token ids and one shared token table keep the data compact.
def dashboard(lm, tok, sae, info, folder, n_show, E, R=10, Q=5):
    cap = info['data_dir']
    # the capture the SAE trained on: still there, and of the SAE's model and layer
    if not os.path.exists(os.path.join(cap, 'meta.json')):
        config = info['capture']['config']
        args = ' '.join(f'--{k}={shlex.quote(str(v))}' for k, v in config.items())
        raise SystemExit(f"the SAE's capture '{cap}' is gone (moved or deleted): recreate it with "
                         f"`python capture.py {args} --out_dir={cap}`")
    meta = check_capture(cap)
    if (meta['model'], meta['hook']) != (info['model'], info['hook']):
        raise SystemExit(f"'{cap}' holds activations of {meta['model']} {meta['hook']}, but the "
                         f"SAE was trained on {info['model']} {info['hook']}: recapture it")
    # the one pass over the capture, timed for the README
    t0 = time.time()
    count, hist, (top, sample) = scan(sae, os.path.join(cap, 'acts.npy'), E, R)
    t_scan = time.time() - t0
    arrays = {f: np.load(os.path.join(cap, f + '.npy')) for f in ('tokens', 'ctx', 'pos', 'first')}
    # live latents only: a latent that never fired has nothing to show
    live = torch.nonzero(count).flatten()[:n_show or None]
    up, down = logit_effects(lm, sae, live)
    # every example's window, both tables at once: (ids, acts, place, value) by (table, latent)
    ex = {}
    for kind, (key, row, win) in (('top', top), ('sample', sample)):
        L, j = torch.nonzero(key[live] > -math.inf, as_tuple=True)
        rows, wins = row[live][L, j].numpy(), win[live][L, j].numpy()
        for i, w, window in zip(live[L].tolist(), wins, windows(rows, wins, arrays)):
            ex.setdefault((kind, i), []).append(window + (float(w[BEFORE]),))
    # one shared token table, each token shown anywhere decoded once; the most frequent first, so
    # that common tokens get short indices (with the shading in tenths: 18.1 -> 16.3 MB by default)
    freq = Counter([t for exs in ex.values() for e in exs for t in e[0]] +
                   [t for ts in up + down for t in ts])
    vocab = [t for t, _ in freq.most_common()]
    at = {t: j for j, t in enumerate(vocab)}

    # an example as the page reads it: token indices, activations in tenths of the latent's max
    # (the shading, as in OpenAI's explainer prompts), the firing token's place and its value
    def pack(e, big):
        return [[at[t] for t in e[0]], [round(10 * a / big) for a in e[1]], e[2], round(e[3], 3)]
    # one record per live latent, in index order
    latents = []
    for j, i in enumerate(live.tolist()):
        big = ex['top', i][0][3]
        # the random sample by value, in Q groups of equal size: examples from each quantile
        s = sorted(ex['sample', i], key=lambda e: e[3])
        quant = [[pack(e, big) for e in s[q * len(s) // Q:(q + 1) * len(s) // Q]] for q in range(Q)]
        # the histogram from its first to its last nonempty bin (the page labels both ends)
        nz = torch.nonzero(hist[i]).flatten()
        latents.append({'i': i, 'density': count[i].item() / len(arrays['ctx']),
                        'count': count[i].item(), 'max': round(big, 3),
                        'hist': [nz[0].item(), hist[i, nz[0]:nz[-1] + 1].tolist()],
                        'top': [pack(e, big) for e in ex['top', i]], 'quant': quant,
                        'promotes': [at[t] for t in up[j]], 'suppresses': [at[t] for t in down[j]]})
    # everything the page shows, and browser.json for programs
    data = {'model': info['model'], 'hook': info['hook'], 'n_latents': len(count), 'k': sae.k,
            'dead': int((count == 0).sum()),
            **training_record(info, folder), 'vocab': [tok.decode([t]) for t in vocab],
            'config': {'sae': info['config'], 'capture': info['capture'].get('config')},
            'latents': latents}
    text = json.dumps(data, separators=(',', ':'))
    # '</' inside a script element would end it early
    page = PAGE.replace('DATA', text.replace('</', '<\\/'))
    write_file(os.path.join(folder, 'browser.html'), page)
    write_file(os.path.join(folder, 'browser.json'), text)
    print(f"wrote {folder}/browser.html ({len(text) / 1e6:.1f} MB of data) and browser.json: "
          f"{len(latents)} live latents of {len(count)}, scanned in {t_scan:.0f}s")

# The page: it renders from the JSON embedded in it, with no server and no external asset. Plain
# DOM and inline SVG, so that a reader can change it without a toolchain.
PAGE = '''<!doctype html><meta charset="utf-8"><title>nanoSAE dashboard</title>
<style>
body { font: 14px sans-serif; margin: 1.5em; color: #222 }
nav { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc }
#main { display: flex; gap: 1.5em } #list { width: 14em; height: 80vh; overflow: auto }
#card { flex: 1 } .ex { font-family: monospace; white-space: pre; margin: 2px 0 }
.peak { outline: 1px solid #c60 } svg { display: block; margin: .3em 0 1em }
</style>
<h1 id="title"></h1><div id="overview"></div>
<nav>latent <input id="jump" type="number" min="0" style="width:6em">
<button id="prev">&lt;</button><button id="next">&gt;</button> sort by <select id="sort">
<option>index</option><option>density</option></select>
<input id="q" placeholder="filter: a word in the examples" size="30"> <span id="shown"></span></nav>
<div id="main"><ol id="list"></ol><div id="card"></div></div>
<script type="application/json" id="data">DATA</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent)
const $ = id => document.getElementById(id)
const esc = s => String(s).replace(/[&<>"]/g, c => '&#' + c.charCodeAt(0) + ';')
const byId = new Map(D.latents.map(l => [l.i, l]))
// bars: each count a rect that keeps its count in data-count; labels under both ends
function bars(counts, left, right, w = 420, h = 80) {
  const top = Math.max(...counts, 1), bw = w / counts.length
  return `<svg width="${w}" height="${h + 14}">` + counts.map((c, j) =>
    `<rect data-count="${c}" x="${j * bw}" y="${h - h * c / top}" width="${bw * .9}" ` +
    `height="${h * c / top}" fill="#c60"><title>${c}</title></rect>`).join('') +
    `<text x="0" y="${h + 12}" font-size="10">${left}</text>` +
    `<text x="${w}" y="${h + 12}" font-size="10" text-anchor="end">${right}</text></svg>`
}
// a curve of ys against x, scaled to its own range
function curve(name, x, ys, w = 300, h = 60) {
  const lo = Math.min(...ys), hi = Math.max(...ys), xm = Math.max(...x)
  const p = x.map((t, j) => `${w * t / xm},${h - 2 - (h - 4) * (ys[j] - lo) / (hi - lo || 1)}`)
  const r = v => v.toPrecision(3)
  return `${name} (${r(hi)} to ${r(lo)}, last ${r(ys.at(-1))})` +
    `<svg width="${w}" height="${h}"><polyline fill="none" stroke="#c60" points="${p}"/></svg>`
}
// the SAE as a whole: what it is, how good it is, how it trained, how its densities spread
function overview() {
  $('title').textContent = `${D.model}, ${D.hook}: ${D.n_latents} latents, k=${D.k}`
  const rows = Object.entries({...D.eval, dead_latents: D.dead})
  let h = '<table>' + rows.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${+v.toPrecision(5)}` +
    '</td></tr>').join('') + '</table>'
  if (D.curves.tokens.length) h += curve('batch FVU vs tokens', D.curves.tokens, D.curves.fvu) +
    curve('dead % vs tokens', D.curves.tokens, D.curves.dead_pct)
  // log10 densities in quarter-decade bins from 1e-7 to 1; the dead are counted apart above
  const hist = new Array(28).fill(0)
  for (const l of D.latents) hist[Math.min(27, Math.floor((Math.log10(l.density) + 7) * 4))]++
  $('overview').innerHTML = h + 'live latents by log10 density' + bars(hist, '1e-7', '1') +
    `<details><summary>config</summary><pre>${esc(JSON.stringify(D.config, null, 1))}</pre>` +
    '</details>'
}
// an example: every token shaded by the latent's activation on it, the firing token outlined
function example([ids, acts, at, value]) {
  return '<div class="ex">' + ids.map((t, j) => `<span style="background:rgba(255,140,0,` +
    `${acts[j] / 10})"` + (j == at ? ` class="peak" data-act="${value}"` : '') +
    `>${esc(D.vocab[t])}</span>`).join('') + '</div>'
}
// a latent's card: density, activation histogram, top and per-quantile examples, logit effects
function card(i) {
  const l = byId.get(i)
  if (!l) return $('card').innerHTML = `<h2>latent ${i}</h2>dead or absent: it never fired`
  const edge = b => (2 ** (b / 4 - 10)).toPrecision(2)
  const toks = ts => ts.map(t => `<code>${esc(D.vocab[t])}</code>`).join(' ')
  $('card').innerHTML = `<h2 data-latent="${i}">latent ${i}</h2><p>density ` +
    `${(100 * l.density).toPrecision(3)}% (${l.count} activations), max ${l.max}</p>` +
    'nonzero activations, log scale' +
    bars(l.hist[1], edge(l.hist[0]), edge(l.hist[0] + l.hist[1].length)) +
    '<h3>top activations</h3>' + l.top.map(example).join('') + l.quant.map((exs, q) => exs.length ?
      `<h3>quantile ${q + 1} of ${l.quant.length}</h3>` + exs.map(example).join('') : '').join('') +
    `<p>promotes ${toks(l.promotes)}<br>suppresses ${toks(l.suppresses)}</p>`
  $('jump').value = i
}
// each latent's text for the filter: the tokens of its examples, lowercased
for (const l of D.latents) l.text = l.top.concat(...l.quant).map(ex => ex[0].map(t =>
  D.vocab[t]).join('')).join(' ').toLowerCase()
// the list: the live latents that pass the filter, in the chosen order
let order = []
function list() {
  const key = {index: l => l.i, density: l => -l.density}[$('sort').value]
  const w = $('q').value.toLowerCase()
  order = D.latents.filter(l => l.text.includes(w)).sort((a, b) => key(a) - key(b)).map(l => l.i)
  $('list').innerHTML = order.map(i => `<li><a href="#${i}">${i}</a> ` +
    `${(100 * byId.get(i).density).toPrecision(2)}%</li>`).join('')
  $('shown').textContent = `${order.length} of ${D.latents.length} live latents`
}
const show = () => card(location.hash.length > 1 ? +location.hash.slice(1) : order[0])
// next and previous walk the list in its current order
function step(d) {
  const j = order.indexOf(+$('jump').value) + d
  location.hash = order[Math.max(0, Math.min(order.length - 1, j))]
}
$('sort').value = new URLSearchParams(location.search).get('sort') || 'index'
$('sort').onchange = $('q').oninput = () => { list(); show() }
$('jump').onchange = () => location.hash = $('jump').value
$('prev').onclick = () => step(-1)
$('next').onclick = () => step(1)
window.onhashchange = show
overview()
list()
show()
// from navigation to a rendered page, in ms: the README's measurement
document.body.dataset.renderMs = Math.round(performance.now())
</script>
'''

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    # every key checked before anything is loaded
    config = configure(globals(), config_keys, rules)
    if any(a.startswith('--prompt=') for a in sys.argv[1:]) and not prompt.strip():
        raise SystemExit("--prompt is empty: give some text, e.g. --prompt=\"The capital of "
                         "France is\"")
    device = pick_device(device)
    # -------------------------------------------------------------------------
    # the SAE, and the model and block it was trained on (both named in the SAE's file)
    # the SAE first: it names the model and the layer
    sae, info = load_sae(sae_path, device)
    n, d = sae.W_dec.shape
    if latent != -1 and not 0 <= latent < n:
        raise SystemExit(f"--latent={latent} is out of range: this SAE has latents 0..{n - 1}")
    # the model by the name stored in the SAE (an HF id or a local folder)
    lm, tok = load_model(info['model'], device)
    if lm.config.hidden_size != d:
        raise SystemExit(f"the SAE's d_model {d} does not match {info['model']}'s "
                         f"{lm.config.hidden_size}: pass the SAE trained on it")
    # the block whose output the SAE reads and, when steering, writes
    block = blocks(lm)[1][info['layer']]
    # the positions the capture excluded are never changed nor scored
    skip = int(info['capture'].get('excluded', '') != 'nothing')
    folder = sae_path
    if sae_path.endswith('.safetensors'):
        folder = os.path.dirname(os.path.abspath(sae_path))
    # no task named: do the default pair, evaluate and browse
    if not (eval or browse or prompt):
        eval = browse = True

    # -------------------------------------------------------------------------
    # evaluate on text the SAE never saw: the default corpus's held-out articles, or --data
    if eval:
        if not data and info['capture']['corpus'] != 'wiki':
            raise SystemExit("--data= is needed: text the SAE did not train on (.txt, folder, "
                             ".jsonl)")
        docs = read_docs(data) if data else read_docs('wiki', 'heldout')
        ctxs = contexts(tok, docs, info['ctx_len'], eval_tokens, skip)
        r = evaluate_lm(lm, block, sae, ctxs, skip, batch_size, device)
        print('\n'.join(f"{key:28s} {v:.4f}" for key, v in r.items()))
        write_file(os.path.join(folder, 'eval.json'), json.dumps(r, indent=1))
    if browse:
        dashboard(lm, tok, sae, info, folder, browse_latents, n_examples)

    # -------------------------------------------------------------------------
    # inspect: the latents that fire most on each token of the prompt
    if prompt and latent == -1:
        # the prompt's residual stream at the layer, through the SAE's encoder
        ids = tok(prompt, return_tensors='pt').input_ids.to(device)
        vals, idx = sae.encode(run_to_layer(lm, block, ids)[0].float())
        for p, t in enumerate(ids[0].tolist()):
            top = sorted(zip(vals[p].tolist(), idx[p].tolist()), reverse=True)[:top_latents]
            shown = '  '.join(f"{i}:{v:.2f}" for v, i in top)
            if p < skip:
                shown = '(first position: the SAE never saw it)'
            print(f"{tok.decode([t])!r:>16} {shown}")
    # steer: the same prompt and seed, without and with the hook
    elif prompt:
        # strength is in units of the latent's mean activation (the median latent's if it is 0)
        act_mean = [a for a in info.get('act_mean', []) if a > 0]
        unit = info['act_mean'][latent] or float(np.median(act_mean)) if act_mean else 1.0
        ids = tok(prompt, return_tensors='pt').input_ids.to(device)
        # the same seed for both: any difference comes from the hook
        outs = []
        for fn in (None, steer_fn(sae, latent, strength * unit, mode)):
            torch.manual_seed(seed)
            handle = attach(block, fn, skip) if fn else None
            # top_k=0: sample from the whole distribution, as the model gives it
            out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature or None, top_k=0,
                              pad_token_id=tok.eos_token_id)
            if handle:
                handle.remove()
            outs.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        print(f"latent {latent}, {mode} {strength} x {unit:.3g} (its mean activation)\n"
              f"--- clean ---\n{prompt}{outs[0]}\n--- steered ---\n{prompt}{outs[1]}")
