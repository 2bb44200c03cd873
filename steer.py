"""
Run the language model with a trained SAE in the loop: measure how much of the model it keeps, see what each
latent means, and steer generation by pushing one latent. Everything comes from the SAE's path (model, layer, capture).
$ python steer.py                                          # evaluate out/smollm2-l15 and write its feature browser
$ python steer.py --eval=True --data=my.txt                # loss recovered, delta CE, KL on other text
$ python steer.py --prompt="The Eiffel Tower is in"        # the latents that fire most on each token
$ python steer.py --prompt="My favourite food is" --latent=123 --strength=4 --mode=add   # clean vs steered
"""
import os, sys, json, html
os.environ.update({'TQDM_DISABLE': '1', 'HF_HUB_VERBOSITY': 'error', **os.environ})  # before torch loads tqdm: no bars or hub retry noise, so a user mistake stays one line
import numpy as np
import torch
import torch.nn.functional as F
from sae import configure, load_sae, read_rows
from capture import load_model, blocks, read_docs, contexts, pad, run_to_layer

# -----------------------------------------------------------------------------
# config: defaults, override with --key=value
sae_path = 'out/smollm2-l15'  # a folder written by sae.py
eval = False             # evaluate: CE clean / spliced / ablated, loss recovered, KL -> eval.json beside the SAE
browse = False           # write the feature browser: browser.html and browser.json beside the SAE
data = ''                # eval text (.txt, folder of .txt, .jsonl); '': the default corpus's held-out articles
eval_tokens = 20_000     # tokens of eval text
prompt = ''              # inspect (alone) or steer (with --latent)
latent = -1              # the latent to steer
strength = 4.0           # add: multiples of the latent's mean activation; clamp: the value, in the same unit
mode = 'add'             # 'add', 'clamp' or 'ablate'
max_new_tokens = 40
temperature = 0.7        # 0: greedy
seed = 1337              # the clean and the steered completion sample with the same seed
top_latents = 5          # latents shown per token with --prompt
browse_latents = 1000    # latents in the browser, lowest index first (0: all)
n_examples = 8           # top-activating contexts per latent
batch_size = 8           # contexts per forward pass
device = 'cpu'
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------

def attach(block, fn, skip=1):
    """Hook `block` so its output h (B, T, d) becomes fn(h) at every position but the first `skip` of a prompt,
    which the SAE never saw (capture excluded them). A step with the KV cache (T == 1) is always changed."""
    def hook(mod, args, output):
        h = output[0] if isinstance(output, tuple) else output
        lo = skip if h.shape[1] > 1 else 0
        h = torch.cat([h[:, :lo], fn(h[:, lo:])], 1)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    return block.register_forward_hook(hook)

def sae_fn(sae, error=False):
    """h -> the SAE's reconstruction (plus the SAE's error term h - recon, which gives h back)."""
    def fn(h):
        r = sae(h.reshape(-1, h.shape[-1]).float()).view_as(h).to(h.dtype)
        return r + (h - r) if error else r
    return fn

def steer_fn(sae, i, value, mode):
    """add: h + value * d_i; clamp: h + (value - f_i(h)) * d_i, so the SAE's error term stays; ablate: clamp to 0."""
    d_i = sae.W_dec[i]
    def fn(h):
        if mode == 'add': return h + value * d_i
        vals, idx = sae.encode(h.reshape(-1, h.shape[-1]).float())
        f_i = (vals * (idx == i)).sum(-1).view(*h.shape[:-1], 1).to(h.dtype)
        return h + ((value if mode == 'clamp' else 0) - f_i) * d_i
    return fn

@torch.no_grad()
def evaluate_lm(lm, block, sae, ctxs, skip, bs, device):
    """Next-token CE (nats) clean, with the SAE spliced in, spliced plus its error term, zero- and mean-ablated
    at the layer; loss recovered and KL(clean || spliced). Only positions >= skip are changed and scored."""
    tot, cnt = 0, 0
    for j in range(0, len(ctxs), bs):  # the mean activation over real tokens at positions >= skip, for mean ablation
        ids, mask = pad(ctxs[j:j + bs], device)
        m = mask[:, skip:, None]
        tot, cnt = tot + (run_to_layer(lm, block, ids, mask)[:, skip:] * m).sum((0, 1)), cnt + m.sum()
    mean = tot / cnt
    modes = {'clean': None, 'spliced': sae_fn(sae), 'spliced+error': sae_fn(sae, error=True),
             'zero_ablated': torch.zeros_like, 'mean_ablated': lambda h: mean.expand_as(h)}
    ce, kl, n = dict.fromkeys(modes, 0.0), 0.0, 0
    for j in range(0, len(ctxs), bs):
        ids, mask = pad(ctxs[j:j + bs], device)
        tgt = mask[:, skip + 1:].bool()  # predictions from positions >= skip of real tokens
        for name, fn in modes.items():
            handle = attach(block, fn, skip) if fn else None
            logp = F.log_softmax(lm(input_ids=ids, attention_mask=mask).logits[:, skip:-1].float(), -1)[tgt]
            if handle: handle.remove()
            ce[name] += -logp.gather(1, ids[:, skip + 1:][tgt][:, None]).sum().item()
            if name == 'clean': clean = logp
            if name == 'spliced': kl += (clean.exp() * (clean - logp)).sum().item()
        n += int(tgt.sum())
    r = {f'ce_{m}': v / n for m, v in ce.items()}
    r['loss_recovered_pct'] = 100 * (r['ce_zero_ablated'] - r['ce_spliced']) / (r['ce_zero_ablated'] - r['ce_clean'])
    r['loss_recovered_vs_mean_pct'] = 100 * (r['ce_mean_ablated'] - r['ce_spliced']) / (r['ce_mean_ablated'] - r['ce_clean'])
    return {**r, 'delta_ce': r['ce_spliced'] - r['ce_clean'], 'kl': kl / n, 'tokens': n}

@torch.no_grad()
def scan(sae, acts, E, chunk=8192):
    """Density and the E top-activating rows of every latent over a capture, one chunk of rows at a time: the
    table and the chunk's (latent, value, row) triples are sorted by latent then value, and E kept per latent."""
    N, n = np.load(acts, mmap_mode='r').shape[0], sae.W_dec.shape[0]
    top_v, top_r, count = torch.zeros(n, E), torch.zeros(n, E, dtype=torch.long), torch.zeros(n)
    for s in range(0, N, chunk):
        vals, idx = sae.encode(read_rows(acts, np.arange(s, min(N, s + chunk))))
        count.index_add_(0, idx.flatten(), (vals > 0).float().flatten())
        lat = torch.cat([torch.arange(n).repeat_interleave(E), idx.flatten()])
        val = torch.cat([top_v.flatten(), vals.flatten()])
        row = torch.cat([top_r.flatten(), torch.arange(s, s + len(vals)).repeat_interleave(idx.shape[1])])
        o = val.argsort(descending=True); o = o[lat[o].argsort(stable=True)]; lo = lat[o]  # by latent, then value
        keep = torch.arange(len(o)) - torch.searchsorted(lo, torch.arange(n))[lo] < E  # the first E of each latent
        top_v, top_r = val[o][keep].view(n, E), row[o][keep].view(n, E)
    return count / N, top_v.T, top_r.T

def browser(lm, tok, sae, info, n_show, n_examples):
    """Write browser.html (one static page, no external assets; type a word to filter) and browser.json."""
    cap = info['data_dir']
    if not os.path.exists(os.path.join(cap, 'meta.json')): raise SystemExit(f"the SAE's capture '{cap}' is gone: rerun `python capture.py --out_dir={cap}`")
    density, top_v, top_r = scan(sae, os.path.join(cap, 'acts.npy'), n_examples)
    tokens, ctx, pos = (np.load(os.path.join(cap, f + '.npy'), mmap_mode='r') for f in ('tokens', 'ctx', 'pos'))
    first = np.load(os.path.join(cap, 'first.npy'))
    base = lm.get_submodule(blocks(lm)[0].rsplit('.', 1)[0])
    norm = next(getattr(base, a) for a in ('norm', 'ln_f', 'final_layernorm') if hasattr(base, a))
    show = [i for i in range(len(density)) if density[i] > 0][:n_show or None]
    logits = lm.get_output_embeddings()(norm(sae.W_dec[show][None]))[0]  # decoder rows through final norm + unembedding
    up, down = logits.topk(8, -1).indices.tolist(), (-logits).topk(8, -1).indices.tolist()
    out, cards = [], []
    for j, i in enumerate(show):
        ex = []
        for v, r in zip(top_v[:, i].tolist(), top_r[:, i].tolist()):
            if v <= 0: continue
            lo, hi = max(r - 12, r - int(pos[r]) + (pos[r] > 0)), min(r + 4, len(ctx))
            rs = [q for q in range(lo, hi) if ctx[q] == ctx[r]]
            toks = ([int(first[ctx[r]])] if pos[rs[0]] == 1 else []) + [int(tokens[q]) for q in rs]
            ex.append({'act': round(v, 3), 'tokens': [tok.decode([t]) for t in toks], 'at': len(toks) - len(rs) + rs.index(r)})
        out.append({'latent': i, 'density': round(float(density[i]), 6), 'promotes': [tok.decode([t]) for t in up[j]],
                    'suppresses': [tok.decode([t]) for t in down[j]], 'examples': ex})
        e = html.escape
        lis = ''.join('<li>' + ''.join(f'<mark title="{x["act"]}">{e(t)}</mark><sub>{x["act"]}</sub>' if q == x['at'] else e(t)
                                       for q, t in enumerate(x['tokens'])) + '</li>' for x in ex)
        cards.append(f'<div class="latent" id="l{i}"><h3>latent {i} <small>density {100 * density[i]:.3f}%</small></h3>'
                     f'<p>promotes: <b>{e(" ".join(map(repr, out[-1]["promotes"])))}</b><br>suppresses: {e(" ".join(map(repr, out[-1]["suppresses"])))}</p><ol>{lis}</ol></div>')
    page = (f'<!doctype html><meta charset="utf-8"><title>nanoSAE: {html.escape(info["hook"])}</title><style>body{{font:14px sans-serif;margin:2em}}'
            f'.latent{{border-top:1px solid #ccc}}li{{white-space:pre-wrap;font-family:monospace}}mark{{background:#fc6}}</style>'
            f'<h1>{len(show)} latents of {html.escape(str(info["model"]))}, {html.escape(info["hook"])}</h1>'
            f'<input id="q" placeholder="a word in the contexts" size="40">' + ''.join(cards) +
            '<script>q.oninput=()=>{const w=q.value.toLowerCase();for(const d of document.querySelectorAll(".latent"))'
            'd.style.display=d.textContent.toLowerCase().includes(w)?"":"none"}</script>')
    folder = os.path.dirname(os.path.abspath(sae_path)) if sae_path.endswith('.safetensors') else sae_path
    for name, text in (('browser.html', page), ('browser.json', json.dumps(out))):
        with open(os.path.join(folder, name + '.tmp'), 'w') as f: f.write(text)
        os.replace(os.path.join(folder, name + '.tmp'), os.path.join(folder, name))
    print(f"wrote {folder}/browser.html and browser.json: {len(show)} latents, {n_examples} contexts each")

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    config = configure(globals(), config_keys)
    if any(a.startswith('--prompt=') for a in sys.argv[1:]) and not prompt.strip():
        raise SystemExit("--prompt is empty: give some text, e.g. --prompt=\"The capital of France is\"")
    if mode not in ('add', 'clamp', 'ablate'): raise SystemExit(f"--mode={mode}: valid are add, clamp, ablate")
    sae, info = load_sae(sae_path, device)
    n, d = sae.W_dec.shape
    if latent != -1 and not 0 <= latent < n: raise SystemExit(f"--latent={latent} is out of range: this SAE has latents 0..{n - 1}")
    lm, tok = load_model(info['model'], device)
    if lm.config.hidden_size != d: raise SystemExit(f"the SAE's d_model {d} does not match {info['model']}'s {lm.config.hidden_size}: pass the SAE trained on it")
    block = blocks(lm)[1][info['layer']]
    skip = int(info['capture'].get('excluded', '') != 'nothing')
    if not (eval or browse or prompt): eval = browse = True
    if eval:
        if not data and info['capture']['corpus'] != 'wiki': raise SystemExit("--data= is needed: text the SAE did not train on (.txt, folder, .jsonl)")
        ctxs = contexts(tok, read_docs(data) if data else read_docs('wiki', 'heldout'), info['ctx_len'], eval_tokens, skip)
        r = evaluate_lm(lm, block, sae, ctxs, skip, batch_size, device)
        print('\n'.join(f"{key:28s} {v:.4f}" for key, v in r.items()))
        folder = os.path.dirname(os.path.abspath(sae_path)) if sae_path.endswith('.safetensors') else sae_path
        with open(os.path.join(folder, 'eval.json'), 'w') as f: json.dump(r, f, indent=1)
    if browse: browser(lm, tok, sae, info, browse_latents, n_examples)
    if prompt and latent == -1:  # inspect: the latents that fire most on each token
        ids = tok(prompt, return_tensors='pt').input_ids.to(device)
        vals, idx = sae.encode(run_to_layer(lm, block, ids)[0].float())
        for p, t in enumerate(ids[0].tolist()):
            top = sorted(zip(vals[p].tolist(), idx[p].tolist()), reverse=True)[:top_latents]
            print(f"{tok.decode([t])!r:>16} " + ('(first position: the SAE never saw it)' if p < skip else '  '.join(f"{i}:{v:.2f}" for v, i in top)))
    elif prompt:  # steer: the same prompt and seed, without and with the hook
        act_mean = [a for a in info.get('act_mean', []) if a > 0]
        unit = info['act_mean'][latent] or float(np.median(act_mean)) if act_mean else 1.0
        ids = tok(prompt, return_tensors='pt').input_ids.to(device)
        outs = []
        for fn in (None, steer_fn(sae, latent, strength * unit, mode)):
            torch.manual_seed(seed)
            handle = attach(block, fn, skip) if fn else None
            out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
                              top_k=0, pad_token_id=tok.eos_token_id)
            if handle: handle.remove()
            outs.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        print(f"latent {latent}, {mode} {strength} x {unit:.3g} (its mean activation)\n--- clean ---\n{prompt}{outs[0]}\n--- steered ---\n{prompt}{outs[1]}")
