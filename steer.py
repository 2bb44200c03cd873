"""
Run the language model with a trained SAE in the loop: measure how much of the model it keeps, see
what each latent means, and steer generation by pushing one latent. Everything comes from the
SAE's path (the model, the layer, the capture).
$ python steer.py                                       # evaluate out/smollm2-l15, write its browser
$ python steer.py --eval=True --data=my.txt             # loss recovered, delta CE, KL on other text
$ python steer.py --prompt="The Eiffel Tower is in"     # the latents that fire most on each token
$ python steer.py --prompt="My favourite food is" --latent=123 --strength=4 --mode=add   # steer
"""
import os, sys, json, html
import numpy as np
import torch
import torch.nn.functional as F
from sae import configure, pick_device, write_file, check_capture, load_sae, read_rows
# capture's import also silences progress bars and hub retries before transformers loads
from capture import load_model, blocks, read_docs, contexts, pad, run_to_layer

# -----------------------------------------------------------------------------
# config: defaults, override with --key=value
sae_path = 'out/smollm2-l15'  # a folder written by sae.py
eval = False             # evaluate: CE clean / spliced / ablated, loss recovered, KL -> eval.json
browse = False           # write the feature browser: browser.html and browser.json
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
browse_latents = 1000    # latents in the browser, lowest index first (0: all)
n_examples = 8           # top-activating contexts per latent
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
        tot, cnt = tot + (run_to_layer(lm, block, ids, mask)[:, skip:] * m).sum((0, 1)), cnt + m.sum()
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

# Density and the E top-activating rows of every latent over a capture, one chunk of rows at a time:
# the table and the chunk's (latent, value, row) triples are sorted by latent then value, and the
# first E of each latent kept.
@torch.no_grad()
def scan(sae, acts, E, chunk=8192):
    # the running table: each latent's E best values and their rows, and its count
    N, n = np.load(acts, mmap_mode='r').shape[0], sae.W_dec.shape[0]
    top_v, top_r, count = torch.zeros(n, E), torch.zeros(n, E, dtype=torch.long), torch.zeros(n)
    for s in range(0, N, chunk):
        # one chunk of rows through the encoder: k (value, latent) pairs per row
        vals, idx = sae.encode(read_rows(acts, np.arange(s, min(N, s + chunk))))
        # density: how many rows each latent fires on
        count.index_add_(0, idx.flatten(), (vals > 0).float().flatten())
        # the table so far and this chunk's triples, side by side
        lat = torch.cat([torch.arange(n).repeat_interleave(E), idx.flatten()])
        val = torch.cat([top_v.flatten(), vals.flatten()])
        rows = torch.arange(s, s + len(vals)).repeat_interleave(idx.shape[1])
        row = torch.cat([top_r.flatten(), rows])
        # by latent, then by value: a stable sort by latent keeps the value order within each
        o = val.argsort(descending=True)
        o = o[lat[o].argsort(stable=True)]
        lo = lat[o]
        # each triple's rank within its latent; the first E of each latent stay
        keep = torch.arange(len(o)) - torch.searchsorted(lo, torch.arange(n))[lo] < E
        top_v, top_r = val[o][keep].view(n, E), row[o][keep].view(n, E)
    # (E, n): example j of every latent in row j
    return count / N, top_v.T, top_r.T

# The tokens around row r (12 before, 3 after, within its context, with its token 0 when the capture
# excluded it) and the index of row r's token among them.
def window(r, tokens, ctx, pos, first):
    # a window of the row's own context: never across a context boundary
    lo, hi = max(r - 12, r - int(pos[r]) + (pos[r] > 0)), min(r + 4, len(ctx))
    rs = [q for q in range(lo, hi) if ctx[q] == ctx[r]]
    toks = ([int(first[ctx[r]])] if pos[rs[0]] == 1 else []) + [int(tokens[q]) for q in rs]
    return toks, len(toks) - len(rs) + rs.index(r)

# Write browser.html (one static page, no external assets; type a word to filter) and browser.json
# for programs.
def browser(lm, tok, sae, info, folder, n_show, n_examples):
    # the capture the SAE trained on: its rows are the examples
    cap = info['data_dir']
    check_capture(cap)
    density, top_v, top_r = scan(sae, os.path.join(cap, 'acts.npy'), n_examples)
    # the row metadata, memory-mapped: only the rows shown are read
    tokens, ctx, pos = (np.load(os.path.join(cap, f + '.npy'), mmap_mode='r')
                        for f in ('tokens', 'ctx', 'pos'))
    first = np.load(os.path.join(cap, 'first.npy'))
    # each decoder row through the final norm and the unembedding: the tokens it promotes
    base = lm.get_submodule(blocks(lm)[0].rsplit('.', 1)[0])
    norm = next(getattr(base, a) for a in ('norm', 'ln_f', 'final_layernorm') if hasattr(base, a))
    # live latents only (a dead one has no example to show), lowest index first
    show = [i for i in range(len(density)) if density[i] > 0][:n_show or None]
    logits = lm.get_output_embeddings()(norm(sae.W_dec[show][None]))[0]
    up, down = logits.topk(8, -1).indices.tolist(), (-logits).topk(8, -1).indices.tolist()
    out, cards, e = [], [], html.escape
    for j, i in enumerate(show):
        ex = []
        # a value of 0 is padding of the table: the latent fired on fewer than E rows
        for v, r in zip(top_v[:, i].tolist(), top_r[:, i].tolist()):
            if v <= 0:
                continue
            toks, at = window(r, tokens, ctx, pos, first)
            ex.append({'act': round(v, 3), 'tokens': [tok.decode([t]) for t in toks], 'at': at})
        promotes, suppresses = ([tok.decode([t]) for t in ts] for ts in (up[j], down[j]))
        out.append({'latent': i, 'density': round(float(density[i]), 6), 'promotes': promotes,
                    'suppresses': suppresses, 'examples': ex})
        # one card per latent: each context a list item, the firing token marked with its value
        lis = ''.join('<li>' + ''.join(
            f'<mark title="{x["act"]}">{e(t)}</mark><sub>{x["act"]}</sub>' if q == x['at']
            else e(t) for q, t in enumerate(x['tokens'])) + '</li>' for x in ex)
        cards.append(f'<div class="latent" id="l{i}"><h3>latent {i} <small>density '
                     f'{100 * density[i]:.3f}%</small></h3><p>promotes: '
                     f'<b>{e(" ".join(map(repr, promotes)))}</b><br>suppresses: '
                     f'{e(" ".join(map(repr, suppresses)))}</p><ol>{lis}</ol></div>')
    # no external asset: the page works from disk, offline
    style = ('body{font:14px sans-serif;margin:2em}.latent{border-top:1px solid #ccc}'
             'li{white-space:pre-wrap;font-family:monospace}mark{background:#fc6}')
    # the filter: a card stays visible when its text holds the typed word
    script = ('q.oninput=()=>{const w=q.value.toLowerCase();for(const d of document.'
              'querySelectorAll(".latent"))d.style.display=d.textContent.toLowerCase()'
              '.includes(w)?"":"none"}')
    # the whole page in one string: one file to open, copy or mail
    page = (f'<!doctype html><meta charset="utf-8"><title>nanoSAE: {e(info["hook"])}</title>'
            f'<style>{style}</style><h1>{len(show)} latents of {e(str(info["model"]))}, '
            f'{e(info["hook"])}</h1><input id="q" placeholder="a word in the contexts" size="40">'
            + ''.join(cards) + f'<script>{script}</script>')
    write_file(os.path.join(folder, 'browser.html'), page)
    write_file(os.path.join(folder, 'browser.json'), json.dumps(out))
    print(f"wrote {folder}/browser.html and browser.json: {len(show)} latents, {n_examples} "
          f"contexts each")

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
        browser(lm, tok, sae, info, folder, browse_latents, n_examples)

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
