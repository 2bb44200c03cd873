"""
Run the language model with a trained SAE in the loop: measure how much of the model it keeps, see
what each latent means, and steer generation by pushing one latent. Everything comes from the
SAE's path (the model, the layer, the capture).
$ python steer.py                                       # evaluate out/smollm2-l15, its dashboard
$ python steer.py --evaluate=True --data=my.txt         # loss recovered, delta CE, KL on other text
$ python steer.py --prompt="The Eiffel Tower is in"     # the latents that fire most on each token
$ python steer.py --prompt="My favourite food is" --latent=123 --strength=0.5   # steer by hand
$ python steer.py --probe=True                          # k-sparse probes on the documents' labels
$ python steer.py --explain=50                          # explain and score 50 latents: interp.json
$ python steer.py --explain=50 --explainer=path/to/model.gguf      # a local instruct model
$ python steer.py --explain=50 --explainer=http://localhost:11434/v1 --explainer_model=llama3.1:8b
$ python steer.py --verify=40                           # verify 40 latents by steering them
Read it in order: the hooks and steering by hand, evaluate, the codes, probe, explain, verify; the
LLM client and the dashboard are plumbing for a second read; main runs the stages.
"""
import os, re, sys, json, math, time, hashlib, functools, itertools, threading
import urllib.request, urllib.error
from collections import Counter, namedtuple
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
# before torch loads tqdm: no progress bars or hub retry noise, so a user mistake stays one line
os.environ.update({'TQDM_DISABLE': '1', 'HF_HUB_VERBOSITY': 'error', **os.environ})
import numpy as np
import torch
import torch.nn.functional as F
from sae import (configure, pick_device, pick_dtype, lock, write_file, read_json, check_capture,
                 load_sae, read_rows)
from capture import load_model, blocks, read_docs, contexts, pad, run_to_layer, hidden

# -----------------------------------------------------------------------------
# config: defaults, override with --key=value
sae_path = 'out/smollm2-l15'  # a folder written by sae.py
evaluate = False         # CE clean / spliced / ablated, loss recovered, KL -> eval.json
data = ''                # evaluation text (.txt, folder of .txt, .jsonl); '': unseen articles
eval_tokens = 10_000     # tokens of evaluation text
probe = False            # k-sparse probes on the capture's document labels -> eval.json
explain = 0              # explain and score this many latents, chosen with the seed -> interp.json
verify = 0               # verify this many latents by steering them (the same draw) -> verify.json
latents = ''             # these latents instead of a draw, e.g. '3,17,42' (alone: explain them)
explainer = ''           # an instruct model: HF id, folder, .gguf file, or an OpenAI-compatible
                         # URL (http://host/v1); '': the SAE's own model
explainer_model = ''     # the model an endpoint serves, e.g. 'llama3.1:8b' (Ollama)
api_key_env = 'OPENAI_API_KEY'  # the environment variable with the endpoint's key (sent if set)
requests_in_flight = 4   # an endpoint's concurrent requests
timeout = 120.0          # seconds to wait for an endpoint's answer
browse = False           # the dashboard: browser.html and browser.json
browse_latents = 0       # live latents in the dashboard, lowest index first (0: all)
n_examples = 8           # top-activating examples per latent (plus 10 over its range)
prompt = ''              # inspect (alone) or steer (with --latent)
latent = -1              # the latent to steer
strength = 0.5           # add, clamp: in units of the residual stream's median norm at the
                         # layer (clamp: the latent's value)
mode = 'add'             # 'add', 'clamp' or 'ablate'
max_new_tokens = 40
temperature = 0.7        # steering and verify's continuations (0: greedy)
seed = 1337              # the clean and the steered completion sample with the same seed
top_latents = 5          # latents shown per token with --prompt
batch_size = 8           # contexts per forward pass
device = 'cpu'           # 'cpu', 'cuda' or 'cuda:N'
dtype = 'auto'           # the model and the encoding of the capture: 'auto' (bfloat16 where
                         # native, else float32), 'float32' or 'bfloat16'
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# the valid values of each key (sae.configure checks them); latent is checked against the SAE
rules = {'eval_tokens': 'v >= 1', 'explain': 'v >= 0', 'requests_in_flight': 'v >= 1',
         'verify': 'v >= 0',
         'timeout': 'v > 0', 'browse_latents': 'v >= 0', 'n_examples': 'v >= 1',
         'latent': 'v >= -1', 'mode': ('add', 'clamp', 'ablate'), 'max_new_tokens': 'v >= 1',
         'temperature': 'v >= 0', 'seed': 'v >= 0', 'top_latents': 'v >= 1', 'batch_size': 'v >= 1',
         'dtype': ('auto', 'float32', 'bfloat16')}

# -----------------------------------------------------------------------------
# hooks: the SAE in the model, and steering by hand

# Hook `block` so its output h (B, T, d) becomes fn(h) at every position but the first `skip` of a
# prompt, which the SAE never saw (capture excluded them). A step with the KV cache (T == 1) is
# always changed: one peer's tutorial skips it, so it never steers generated tokens.
def attach(block, fn, skip=1):
    def hook(mod, args, output):
        h = hidden(output)
        lo = skip if h.shape[1] > 1 else 0
        # in place: the next block reads this very tensor (no gradient flows here)
        h[:, lo:] = fn(h[:, lo:])
    return block.register_forward_hook(hook)

# h -> the SAE's reconstruction, the SAE working in float32 on (rows, d).
def sae_fn(sae):
    return lambda h: sae(h.reshape(-1, h.shape[-1]).float()).view_as(h).to(h.dtype)

# add: h + value * d_i; clamp: h + (value - f_i(h)) * d_i, which keeps the SAE's error term
# (replacing h by the reconstruction would add the error to every steered run); ablate: clamp 0.
# (attach writes the result back into h, in h's dtype.)
def steer_fn(sae, i, value, mode):
    d_i = sae.W_dec[i]

    def fn(h):
        if mode == 'add':
            return h + value * d_i
        # f_i(h): latent i's activation (0 where the arch did not choose it)
        f_i = sae.encode(h.reshape(-1, h.shape[-1]).float())[:, i].view_as(h[..., :1])
        return h + ((value if mode == 'clamp' else 0) - f_i) * d_i
    return fn

# The latents that fire most on each token of a prompt (ids (1, T)), `top` of them a token, as
# latent:value, a line per token.
@torch.no_grad()
def inspect(lm, tok, block, sae, ids, skip, top):
    z = sae.encode(run_to_layer(lm, block, ids)[0].float())
    for p, (v, i) in enumerate(zip(*z.topk(top, dim=1))):
        shown = '  '.join(f"{j}:{x:.2f}" for x, j in zip(v.tolist(), i.tolist()) if x > 0)
        print(f"{tok.decode(ids[0, p])!r:>16} {shown if p >= skip else '(the SAE never saw it)'}")

# Each prompt (P, L) continued with each of the hooks fns on the block (K * P rows in one batch),
# from position `skip` on, generated tokens included: n new tokens, sampled at `temperature` (0:
# greedy) with noise that depends on the prompt and the step alone, so that a prompt's rows differ
# only by what their hooks do. What the SAE reads in the new tokens, per hook and prompt, off the
# block's output before the hook (the blocks up to it see only the tokens: it is the clean model's
# layer): every latent's mean (K, P, n_latents) and share of tokens fired on; then the first new
# token's log-probabilities, and the new tokens.
@torch.no_grad()
def complete(lm, block, sae, prompts, skip, temperature, seed, n, fns):
    K, P, seen = len(fns), len(prompts), []

    def hook(h):
        # a step with the KV cache feeds one token: its layer, before the hook
        if h.shape[1] == 1:
            seen.append(h[:, 0].float().clone())
        return torch.cat([fn(x) for fn, x in zip(fns, h.split(P))])

    # Gumbel-max: the argmax of logits / temperature plus noise from the seed and the step, the same
    # for every row of a prompt
    def sample(ids, logits):
        g = torch.Generator().manual_seed(seed + ids.shape[1])
        u = torch.rand(P, logits.shape[1], generator=g).clamp_min(1e-20)
        return logits / temperature - (-u.log()).log().repeat(K, 1).to(logits)
    handle = attach(block, hook, skip)
    ids = prompts.repeat(K, 1)
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n + 1,
                      do_sample=False, eos_token_id=None, output_logits=True,
                      logits_processor=[sample] * (temperature > 0), return_dict_in_generate=True)
    handle.remove()
    z = sae.encode(torch.stack(seen[:n], 1).flatten(0, 1)).view(K, P, n, -1)
    return (z.mean(2), (z > 0).float().mean(2),
            out.logits[0].float().log_softmax(-1).view(K, P, -1),
            out.sequences[:, ids.shape[1]:-1].view(K, P, -1))

# -----------------------------------------------------------------------------
# codes and documents: what probe, explain, verify and the dashboard read

# The firing codes of the capture, flat, a row's codes together, rows in order: each one's value,
# latent and row (numpy arrays: it indexes small slices several times faster than torch; float32,
# int32, int32: 384 MB for 1M rows at L0 32)
Codes = namedtuple('Codes', 'vals lat row')

# Every row of the capture through the encoder: its Codes.
@torch.no_grad()
def encode_all(sae, acts, dtype='float32', chunk=8192):
    N, dev = np.load(acts, mmap_mode='r').shape[0], sae.W_dec.device
    out = []
    # chunks in row order: the file is read once, front to back; the codes go to the CPU
    for s in progress('encode the capture (chunks)', range(0, N, chunk)):
        # the encoder's product in dtype, as sae.py trains it
        with torch.autocast(dev.type, getattr(torch, dtype), enabled=dtype != 'float32'):
            z = sae.encode(read_rows(acts, np.arange(s, min(N, s + chunk))).to(dev))
        r, j = torch.nonzero(z, as_tuple=True)
        out.append((z[r, j].float().cpu(), j.int().cpu(), (r + s).int().cpu()))
    return Codes(*(torch.cat(t).numpy() for t in zip(*out)))

# The capture's arrays, with each row's document and label (its context's).
def read_capture(cap_dir):
    cap = {f: np.load(os.path.join(cap_dir, f + '.npy'))
         for f in ('tokens', 'ctx', 'pos', 'first', 'doc', 'label')}
    cap['row_doc'], cap['row_label'] = cap['doc'][cap['ctx']], cap['label'][cap['ctx']]
    return cap

# The test documents of probes and explanations: 1 in 5 of the capture's (by index in the corpus),
# so no probe and no detection score is measured on text that its probe or its explainer saw.
# (sae.py's validation contexts and the corpus's unseen articles are other splits.)
def is_test(doc):
    return doc % 5 == 0

# How many contexts each latent fires in, on the explain side and on the score side (n,) each.
def context_counts(codes, cap, n):
    # each (context, latent) pair once, then split by its context's document
    pairs = np.unique(cap['ctx'][codes.row].astype(np.int64) * n + codes.lat)
    ctx, lat = pairs // n, pairs % n
    ho = is_test(cap['doc'][ctx])
    return np.bincount(lat[~ho], minlength=n), np.bincount(lat[ho], minlength=n)

MIN_EXPLAIN, MIN_SCORE = 20, 5  # contexts a latent must fire in: explain side, score side

# The latents to explain or verify: `which` when named, else `count` drawn uniformly, with the seed,
# among those that fire in enough contexts on both sides of the document split (a choice by density
# or by score would bias the means). The draws nest: the first of a larger draw are a smaller one.
def choose(codes, cap, n, count, which, seed, key):
    n_train, n_test = context_counts(codes, cap, n)
    ok = np.nonzero((n_train >= MIN_EXPLAIN) & (n_test >= MIN_SCORE))[0]
    enough = (f"this SAE has {len(ok)} latents that fire in {MIN_EXPLAIN}+ contexts of the "
              f"explain documents and {MIN_SCORE}+ of the test ones")
    bad = set(which) - set(ok.tolist())
    if bad:
        raise SystemExit(f"--latents: {min(bad)} cannot be explained and scored: {enough}")
    if not which and count > len(ok):
        raise SystemExit(f"--{key}={count} is more than {enough}: pass at most {len(ok)}")
    return which or sorted(ok[np.random.default_rng(seed).permutation(len(ok))[:count]].tolist())

# The final norm: it sits beside the list of blocks, in the base model (model.norm,
# transformer.ln_f, ...).
def final_norm(lm):
    base = lm.base_model
    return next(getattr(base, a) for a in ('norm', 'ln_f', 'final_layernorm') if hasattr(base, a))

# Each decoder row through the final norm and the unembedding: the 8 tokens it promotes and the 8
# it suppresses most, 512 latents at a time (all at once would be a (9216, 49152) table).
def logit_effects(lm, sae, live):
    up, down = [], []
    for j in range(0, len(live), 512):
        d = sae.W_dec[live[j:j + 512]][None].to(lm.dtype)
        logits = lm.get_output_embeddings()(final_norm(lm)(d))[0]
        up += logits.topk(8, -1).indices.tolist()
        down += (-logits).topk(8, -1).indices.tolist()
    return up, down

# -----------------------------------------------------------------------------
# codes and documents: windows of text, for the explainer and the dashboard (skip on a first read)

# Explainer windows: 32 tokens, the firing token the 24th (delphi's shape)
W_BEFORE, W_AFTER = 23, 8

# Latent i on each row of `rows` (consecutive rows of the capture), from the codes as numpy arrays.
def latent_on(codes, i, rows):
    # searched as int32: another dtype would convert the whole array at every call
    s, e = np.searchsorted(codes.row, np.array([rows[0], rows[-1] + 1], codes.row.dtype))
    hit = s + np.nonzero(codes.lat[s:e] == i)[0]
    out = np.zeros(len(rows), np.float32)
    out[codes.row[hit] - rows[0]] = codes.vals[hit]
    return out

# Latent i's rows, largest activation first (ties in row order).
def rows_by_value(codes, i):
    hit = np.nonzero(codes.lat == i)[0]
    return codes.row[hit][np.argsort(-codes.vals[hit], kind='stable')]

# The rows of the window around row r (`before` rows before it, `after` after) that exist and
# belong to r's context: a run, as a context's rows are consecutive. (The dashboard's windows too.)
def window(r, cap, before=W_BEFORE, after=W_AFTER):
    rows = np.arange(max(r - before, 0), min(r + after + 1, len(cap['ctx'])))
    return rows[cap['ctx'][rows] == cap['ctx'][r]]

# The text of a window, tokens decoded one by one; where the latent is above `mark`, the token is
# marked <<like this>> (a run of marked tokens is one mark; a leading space stays outside).
def show(rows, tok, cap, acts=(), mark=math.inf):
    out = ''
    # no activations: plain text (the scorer's texts carry no marks)
    for t, v in itertools.zip_longest(cap['tokens'][rows], acts, fillvalue=0):
        s = tok.decode([int(t)])
        word = s.lstrip()
        out += s[:len(s) - len(word)] + f'<<{word}>>' if v > mark and word else s
    return out.replace('>><<', '').strip()

# -----------------------------------------------------------------------------
# evaluate (--evaluate) -> eval.json

# Next-token CE (nats) of the clean model and of the model with the layer's output replaced: by the
# SAE's reconstruction (spliced), by zeros and by its mean over the text (the ablations); loss
# recovered and KL(clean || spliced). Only positions >= skip are changed and scored.
@torch.no_grad()
def evaluate_lm(lm, block, sae, ctxs, skip, bs, device):
    batches = [pad(ctxs[j:j + bs], device) for j in range(0, len(ctxs), bs)]
    # the layer's mean output over the text's real tokens (the padding's rows left out)
    mean = torch.cat([run_to_layer(lm, block, ids, mask)[:, skip:][mask[:, skip:].bool()]
                      for ids, mask in batches]).mean(0)
    modes = {'clean': lambda h: h, 'spliced': sae_fn(sae), 'zero_ablated': torch.zeros_like,
             'mean_ablated': lambda h: mean.expand_as(h)}
    # sums over tokens, divided by the token count at the end
    ce, kl, n = dict.fromkeys(modes, 0.0), 0.0, 0
    for ids, mask in progress('evaluate: four modes a batch', batches):
        # predictions from positions >= skip, of real tokens
        tgt = mask[:, skip + 1:].bool()
        for name, fn in modes.items():
            handle = attach(block, fn, skip)
            logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
            handle.remove()
            logp = F.log_softmax(logits[:, skip:-1][tgt].float(), -1)
            ce[name] += -logp.gather(1, ids[:, skip + 1:][tgt][:, None]).sum().item()
            # KL(clean || spliced) per token: sum p_clean (log p_clean - log p_spliced)
            if name == 'clean':
                clean = logp
            if name == 'spliced':
                kl += (clean.exp() * (clean - logp)).sum().item()
        n += int(tgt.sum())
    r = {f'ce_{m}': v / n for m, v in ce.items()}

    # the share of the CE gap to an ablation that the SAE closes (100: as good as the clean model)
    def recovered(ablated):
        return 100 * (r[ablated] - r['ce_spliced']) / (r[ablated] - r['ce_clean'])
    return {**r, 'loss_recovered_pct': recovered('ce_zero_ablated'),
            'loss_recovered_vs_mean_pct': recovered('ce_mean_ablated'),
            'delta_ce': r['ce_spliced'] - r['ce_clean'], 'kl': kl / n, 'tokens': n}

# -----------------------------------------------------------------------------
# probe (--probe) -> eval.json (skip on a first read)

# A logistic regression with an L2 penalty (sklearn's default, C = 1), fitted by L-BFGS on
# standardized features: the probe of SAEBench's sparse probing, in torch. Returns test accuracy.
def logistic(X, y, X_test, y_test):
    # standardized, the penalty weighs every feature alike (a latent's scale is arbitrary)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    X, X_test = (X - mu) / sd, (X_test - mu) / sd
    # the weights and, last, the bias (not penalized); the loss is convex, so L-BFGS from zero
    w = torch.zeros(X.shape[1] + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn='strong_wolfe')

    # the mean log-loss plus ||w||^2 / 2n: sklearn's sum of log-losses plus ||w||^2 / 2, over n
    def loss():
        opt.zero_grad()
        z = X @ w[:-1] + w[-1]
        out = F.binary_cross_entropy_with_logits(z, y) + (w[:-1] ** 2).sum() / (2 * len(y))
        out.backward()
        return out
    opt.step(loss)
    with torch.no_grad():
        return ((X_test @ w[:-1] + w[-1] > 0).float() == y_test).float().mean().item()

# k-sparse probing (SAEBench): for each class, one vs rest, negatives drawn from the other classes
# to as many as the positives, on train and test documents apart; the k latents whose means differ
# most between the classes on the train documents, and a logistic probe on those. The same on the
# residual stream's dimensions, and on all of them. Features are per-document means (docs, f).
def sparse_probe(lat, res, label, test, names, ks=(1, 2, 5, 10), seed=0):
    # the negatives are drawn with a fixed seed: a rerun gives the same numbers
    g = torch.Generator().manual_seed(seed)
    acc = {f'{kind}_top{k}': [] for kind in ('sae', 'residual') for k in ks}
    acc['residual_full'], best = [], {}
    for c, name in progress('probe: classes', list(enumerate(names))):
        # balanced sets: every positive, and as many negatives at random, per split
        sets = []
        for split in (~test, test):
            pos = torch.nonzero(split & (label == c)).flatten()
            neg = torch.nonzero(split & (label >= 0) & (label != c)).flatten()
            neg = neg[torch.randperm(len(neg), generator=g)[:len(pos)]]
            sets += [torch.cat([pos, neg]), (torch.arange(len(pos) + len(neg)) < len(pos)).float()]
        tr, y, te, y_te = sets
        # a class with hardly any documents on one side gives no accuracy worth averaging
        if min(len(tr), len(te)) < 4:
            continue
        for kind, X in (('sae', lat), ('residual', res)):
            # the features ranked by |mean over positives - mean over negatives|, train only
            order = (X[tr][y == 1].mean(0) - X[tr][y == 0].mean(0)).abs().argsort(descending=True)
            for k in ks:
                f = order[:k]
                acc[f'{kind}_top{k}'].append(logistic(X[tr][:, f], y, X[te][:, f], y_te))
            # the class's single best latent: a label for that latent, and a check of the probe
            if kind == 'sae':
                best[name] = {'latent': order[0].item(), 'accuracy': acc['sae_top1'][-1]}
        # the ceiling: every residual dimension, what a dense linear probe reaches
        acc['residual_full'].append(logistic(res[tr], y, res[te], y_te))
    # the mean over classes, then each class's best single latent
    out = {f'probe_{key}': sum(v) / max(len(v), 1) for key, v in acc.items()}
    return {**out, 'probe_classes': len(best), 'probe_best_latent': best}

# The probes on the SAE's capture: each document's mean latent activations and mean residual
# vector (over its stored rows), test documents for the test.
def probe_capture(sae, meta, cap, codes, acts):
    # documents renumbered 0..D-1 in order of first appearance
    docs, row_doc = np.unique(cap['row_doc'], return_inverse=True)
    D, n, row_doc = len(docs), sae.W_dec.shape[0], torch.from_numpy(row_doc)
    # the stored rows of each document: the divisor of both means
    rows = torch.bincount(row_doc, minlength=D).float()[:, None]
    # (D, n) latent sums from every code (dense: 10k documents x 9216 latents is 370 MB), then
    # means
    lat = torch.zeros(D * n).index_add_(0, row_doc[codes.row] * n + torch.from_numpy(codes.lat),
                                        torch.from_numpy(codes.vals)).view(D, n) / rows
    # the residual stream, summed per document as it streams from disk
    res = torch.zeros(D, meta['d_model'])
    for s in progress('probe: residual means (chunks)', range(0, meta['N'], 65536)):
        r = np.arange(s, min(meta['N'], s + 65536))
        res.index_add_(0, row_doc[r], read_rows(acts, r))
    res /= rows
    # each document's label: that of its contexts (all the same)
    label = torch.zeros(D, dtype=torch.long)
    label[row_doc] = torch.from_numpy(cap['row_label']).long()
    return sparse_probe(lat, res, label, torch.from_numpy(is_test(docs)), meta['labels'])

# -----------------------------------------------------------------------------
# explain (--explain) -> interp.json

# Explain latents and score the explanations: the LLM's, the token baseline and a random one (the
# next latent's, in a ring), each by detection on the same test texts. Returns interp.json.
def interpret(sae, meta, cap, codes, tok, backend, chosen, seed):
    chat, judge, probabilities, workers = backend
    # the clock for seconds_per_latent starts after the model load and the encoding
    t0 = time.time()
    # each latent's examples with its own generator: the same latent gets the same examples
    ex = [explainer_texts(i, codes, cap, tok, np.random.default_rng([seed, i]), meta['labels'])
          for i in chosen]
    # every explanation first: the random control needs another latent's
    numbered = ['\n'.join(f'{j + 1}. {s}' for j, s in enumerate(e['snippets'])) for e in ex]

    # an answer that repeats the prompt or copies a text gets one reminder; then it has failed
    # (None): it is counted, never scored as if it were an explanation
    def explain(snippets):
        ask = explain_messages(snippets)
        first = chat(ask, 40)
        again = ask + [{'role': 'assistant', 'content': first},
                       {'role': 'user', 'content': EXPLAIN_AGAIN}]
        return explanation(first, snippets) or explanation(chat(again, 40), snippets) or None
    llm = parallel(explain, numbered, workers, 'explain: explanations')
    # the random control: the next latent's explanation that did not fail, in a ring
    done = [j for j, e in enumerate(llm) if e]
    ring = {j: done[(q + 1) % len(done)] for q, j in enumerate(done)} if len(done) > 1 else {}

    # the three explanations of latent j (those it has), scored on its test texts
    def score(j):
        kinds = {'llm': llm[j], 'token': ex[j]['token'],
                 'random': llm[ring[j]] if j in ring else None}
        s = {k: detection(judge(text, ex[j]['texts']), ex[j]['truth'], probabilities)
             for k, text in kinds.items() if text}
        print(f"latent {chosen[j]:6d}: {str(llm[j])[:60]!r} {s}", flush=True)
        return s
    # the time per latent covers examples, explaining and scoring
    scores = parallel(score, range(len(chosen)), workers, 'explain: scores')
    latents = {str(i): {'explanation': llm[j], 'token_baseline': e['token'], 'scores': scores[j],
                        'random_from': int(chosen[ring[j]]) if j in ring else None, **e['about']}
               for j, (i, e) in enumerate(zip(chosen, ex))}
    # the LLM's explanations only mean something next to the controls'
    summary = {k: summarize([s[k] for s in scores if k in s]) for k in ('llm', 'token', 'random')
               if any(k in s for s in scores)}
    headline = ('auroc_mean: the AUROC of P(yes), free of the scorer\'s prior for yes (balanced '
                'accuracy cut at the median P(yes) of each latent\'s texts)' if probabilities
                else 'mean: balanced accuracy of the 0/1 answers')
    return {'latents': latents, 'summary': summary, 'headline': headline,
            'failed_explanations': sum(e is None for e in llm), 'prompt_version': PROMPT_VERSION,
            'seconds_per_latent': round((time.time() - t0) / len(chosen), 2)}

# Detection scores of one explanation on one latent's texts (half positives by construction). With
# P(yes) from a local model: the AUROC (the headline: a rank, so the model's prior for 'yes' cancels
# out; a 1.5B model gave every text 0.65-0.82, which a cut at 0.5 calls all 'yes') and balanced
# accuracy with the median P(yes) of these texts as the cut (chosen without the truth). With 0/1
# answers (an endpoint): balanced accuracy. Answers that did not parse (None) are counted.
def detection(p, truth, probabilities):
    # the answers that parsed, by truth: 1 a positive, 0 a negative of the latent's topic, -1 a
    # random one
    got = {t: [q for q, u in zip(p, truth) if u == t and q is not None] for t in (1, 0, -1)}
    pos, neg = got[1], got[0] + got[-1]
    out = {'balanced_accuracy': None, 'failed': sum(q is None for q in p)}
    cut = float(np.median(pos + neg)) if probabilities and pos and neg else 0.5
    # the mean of the two recalls: 0.5 for any constant answer, whatever the mix
    if pos and neg:
        tpr, tnr = np.mean([q > cut for q in pos]), np.mean([q <= cut for q in neg])
        out['balanced_accuracy'] = round(float(tpr + tnr) / 2, 4)
    # the chance that a positive gets a higher P(yes) than a negative (ties: half): against all
    # of them, and against each kind (a broad explanation may tell the latent's texts from random
    # text but not from its topic's); a kind apart only when both kinds are there
    for key, ns in (('auroc', neg), ('auroc_topic', got[0]), ('auroc_random', got[-1])):
        if pos and ns and probabilities and (key == 'auroc' or ns != neg):
            out[key] = round(float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in ns])), 4)
    return out

# -----------------------------------------------------------------------------
# explain: the explainer's texts, prompts and answers (skip on a first read)


# One latent's texts, one per context (its peak): explainer snippets from the explain documents
# (the top 10 contexts and one from each decile of the rest), detection texts from the test
# ones (2 positives per decile; 10 negatives from documents of the latent's topic and 10 random,
# each a window where the latent is 0 on every token), and the token baseline.
def explainer_texts(i, codes, cap, tok, rng, names):
    # the latent on every row of a run of rows
    on = functools.partial(latent_on, codes, i)

    # the latent's rows, largest first (ties in row order), then each context's first: its peak
    r = rows_by_value(codes, i)
    r = r[np.sort(np.unique(cap['ctx'][r], return_index=True)[1])]
    train, test = r[~is_test(cap['row_doc'][r])], r[is_test(cap['row_doc'][r])]

    # n rows from each of the ten deciles of `rows` (largest first)
    def spread(rows, n):
        parts = [p for p in np.array_split(rows, 10) if len(p)]
        return np.concatenate([rng.choice(p, min(len(p), n), replace=False) for p in parts])
    # the top and the whole range: the weak activations make up most firings
    shown = np.concatenate([train[:10], spread(train[10:], 1)])
    # marks at 0.3 of the latent's largest value (delphi's threshold)
    mark = 0.3 * on(train[:1])[0]
    # positives over the whole range too: a score on top examples alone would flatter
    pos = spread(test, 2)
    # the latent's topic: the most common label of its peaks' documents (-1: no labels); its
    # negatives from the same topic test the explanation, not the topic's vocabulary
    labels = cap['row_label'][train]
    topic = int(np.bincount(labels[labels >= 0]).argmax()) if (labels >= 0).any() else -1
    # negatives: windows of test rows where the latent is 0 on every token, truth 0 for the
    # topic's and -1 for the random ones
    pool, negs = np.nonzero(is_test(cap['row_doc']))[0], []
    for kind, rows, m in ((0, pool[cap['row_label'][pool] == topic], 10), (-1, pool, 20)):
        for s in rng.choice(rows, min(len(rows), 40 * m), replace=False):
            if len(negs) == m:
                break
            if not on(window(s, cap)).any():
                negs.append((s, kind))
    # the token baseline: the tokens at the peaks that make up 10% of them or more (at most 3),
    # and at least the most common one
    count = Counter(tok.decode([int(t)]).strip() for t in cap['tokens'][train])
    common = [t for j, (t, c) in enumerate(count.most_common(3)) if j == 0 or c >= 0.1 * len(train)]
    # the scorer's texts: positives then negatives (the truth says which), all unmarked
    scored = np.concatenate([pos, [s for s, _ in negs]]).astype(int)
    return {'snippets': [show(window(s, cap), tok, cap, on(window(s, cap)), mark) for s in shown],
            'texts': [show(window(s, cap), tok, cap) for s in scored],
            'truth': [1] * len(pos) + [kind for _, kind in negs],
            'token': 'the token' + 's' * (len(common) > 1) + ' ' +
                     ', '.join(f"'{t}'" for t in common),
            # for interp.json: where the texts come from
            'about': {'topic': names[topic] if topic >= 0 else None,
                      'contexts': {'explain': len(train), 'score': len(test)},
                      'positives': len(pos), 'negatives': len(negs),
                      'explain_rows': shown.tolist(), 'score_rows': scored.tolist()}}

# bump it when a prompt changes: interp.json records it, and the cache keys hold the prompts, so no
# answer to an old prompt is reused for a new one
PROMPT_VERSION = 2
# The explainer's conversation: the task as a system message, two worked examples as earlier
# turns, then the latent's snippets and the question last. A small model asked first and shown the
# snippets after repeats the instructions or copies a snippet (SmolLM2-135M and a 1.5B Qwen did).
EXPLAIN_SYSTEM = ("You label the features of a language model. You get short texts; in each, the "
                  "tokens where one feature is active are marked <<like this>>. You reply with a "
                  "short phrase of 2 to 8 words that says what the marked tokens have in common.")
EXPLAIN_ASK = ("Texts:\n{snippets}\n\nWhat do the marked tokens have in common? Reply with a short "
               "phrase.")
EXPLAIN_EXAMPLES = [
    ("1. ships crossed the Atlantic <<Ocean>> in\n2. fish that live in the deep <<sea>>\n"
     "3. the river flows into the <<ocean>> near", "the sea or the ocean"),
    ("1. She <<walked>> home after school\n2. they <<played>> in the park\n3. he <<jumped>> "
     "over the fence", "verbs in the past tense")]
# the second try, after an answer that repeats the instructions or copies a text
EXPLAIN_AGAIN = ("That repeats the texts or the question. In 2 to 8 words of your own: what do the "
                 "marked tokens have in common?")
# detection: the explanation quoted, the text, and a concrete question. One text per prompt when
# the model's next-token probabilities are at hand (local), five per request and a list in reply
# when only text comes back (an endpoint)
DETECT_ONE = ("A feature of a language model is described as \"{explanation}\".\n\nText: "
              "\"{text}\"\n\nDoes this text contain something that fits the description "
              "\"{explanation}\"? Answer yes or no.")
DETECT_MANY = ("A feature of a language model is described as \"{explanation}\".\n\nFor each "
               "numbered text below, does it contain something that fits that description? "
               "Reply with only a JSON list of 1 (yes) and 0 (no), one per text, e.g. "
               "[1, 0, 0, 1, 0].\n\n{texts}")

# The explainer's messages for numbered snippets: system, the worked examples, the question last.
def explain_messages(snippets):
    shots = [[{'role': 'user', 'content': EXPLAIN_ASK.format(snippets=q)},
              {'role': 'assistant', 'content': a}] for q, a in EXPLAIN_EXAMPLES]
    return [{'role': 'system', 'content': EXPLAIN_SYSTEM}, *sum(shots, []),
            {'role': 'user', 'content': EXPLAIN_ASK.format(snippets=snippets)}]

# The explanation in an answer: its first line that says something, without a leading
# 'Explanation:', quotes or marks; '' when the answer repeats the prompt (its marks, 5 words in a
# row of its instructions, a worked example's answer) or copies a text (5 words in a row of one
# snippet, or a whole one): that is no description, and scoring it would score the snippet's
# words. A short answer may well use a snippet's word ('death'): only runs of 5 count.
def explanation(answer, snippets):
    lines = [re.sub(r'^(explanation|answer|label)\s*:\s*', '', s.strip(), flags=re.I).strip(' "*.')
             for s in answer.splitlines()]
    text = next((s for s in lines if s), '')[:200]
    # the words of a text, lowercase, one space apart
    words = lambda t: ' '.join(re.findall(r"[\w']+", t.lower()))
    said = words(text).split()
    runs = {' '.join(said[i:i + 5]) for i in range(len(said) - 4)}
    # a worked example's answer is the prompt too (SmolLM2-135M gave 'the sea or the ocean' to 15
    # of 45 latents)
    texts = [words(re.sub(r'^\d+\. |<<|>>', '', t)) for t in snippets.splitlines()]
    texts += [words(a) for _, a in EXPLAIN_EXAMPLES]
    prompt = words(EXPLAIN_SYSTEM + ' ' + EXPLAIN_ASK)
    if not said or '<<' in text or words(text) in texts or \
            any(r in t for r in runs for t in [prompt] + texts):
        return ''
    return text

# The numbers over latents of one kind of explanation: mean and spread of balanced accuracy, the
# mean AUROC (None without P(yes)), how many answers failed to parse.
def summarize(scores):
    acc = [s['balanced_accuracy'] for s in scores if s['balanced_accuracy'] is not None]
    # rounded to 4 places; None where no latent has a number
    r4 = lambda xs, f=np.mean: round(float(f(xs)), 4) if xs else None
    auroc = {f'{k}_mean': r4([s[k] for s in scores if k in s])
             for k in ('auroc', 'auroc_topic', 'auroc_random')}
    return {'mean': r4(acc), 'sd': r4(acc, np.std), **auroc,
            'latents': len(acc),
            'failed_answers': sum(s['failed'] for s in scores)}

# -----------------------------------------------------------------------------
# verify (--verify) -> verify.json

# Push a latent, let the model write, and let the SAE judge the text: the clean model's layer on
# the new tokens, through the SAE, gives every latent's rise over the unsteered text of the same
# prompts, and latent i's rank among all n rises gives its p-value; random directions in its place
# measure how often that verifies by chance. README, "Verify by steering", says how each constant
# was chosen.
PROMPTS, PROMPT_TOKENS, NEW_TOKENS, CALIBRATION, KL_BUDGET, FDR = 32, 8, 24, 16, 2.0, 0.05
STRENGTHS = [0.5, 0.75]  # in --strength's unit, the residual's median norm

# The verdict's protocol for latent i and a push at each strength (run: complete()'s): every
# latent's rise over the unsteered continuations (base), averaged over the prompts and scaled by
# its spread on the capture, and i's rank among the n rises (a tie counts against i). The strength
# is the strongest whose first new token moves by at most KL_BUDGET nats (else the weakest): it is
# chosen without reading a rank, so every prompt can judge it: p = i's rank there / n. Returns p,
# the strength's index, and per strength: the rises, the KL, i's rank, i's re-detection (its share
# of the new tokens).
def judge_push(i, run, base, spread):
    rise, logp = (run[0] - base[0]) / spread, run[2]
    kl = (logp.exp() * (logp - base[2])).sum(-1).mean(1)
    rank = (rise.mean(1) >= rise.mean(1)[:, [i]]).sum(1)
    j = int(torch.where(kl <= KL_BUDGET, torch.arange(len(kl), device=kl.device), 0).max())
    return rank[j].item() / len(spread), j, rise, kl, rank, run[1][..., i].mean(1)

# Latent i pushed and judged, with what the push did: at the chosen strength, over all prompts, the
# latents that rose most (each shown by its top tokens) and the tokens whose share of the new
# tokens rose most; per strength, the first token's KL, i's rank, its re-detection (the share of
# new tokens it fires on; verdicts adds a random push's beside it), and 3 samples (the unsteered
# first).
def verify_latent(push, tok, sae, i, pushes, base, spread, codes, cap):
    run = push([steer_fn(sae, i, v, 'add') for v in pushes])
    p, j, rise, kl, rank, redetect = judge_push(i, run, base, spread)
    up = rise[j].mean(0).topk(5)
    count = lambda t: Counter(tok.batch_decode(t.flatten()[:, None]))
    share = count(run[3][j]) - count(base[3])
    return {'p': p, 'strength': j, 'kl': kl.tolist(), 'rank': rank.tolist(),
            'redetect': redetect.tolist(),
            'rose': [[k, v, top_tokens(codes, cap, tok, k)]
                     for v, k in zip(*(t.tolist() for t in up))],
            'tokens': [[t, c / run[3][j].numel()] for t, c in share.most_common(8)],
            'samples': [tok.batch_decode(t[:3]) for t in (base[3][0], *run[3])]}

# -----------------------------------------------------------------------------
# verify: the spread, the null, the false-discovery cut (skip on a first read)

# Each latent's spread on the capture: the standard deviation of its activation over all `rows`
# rows, zeros included. A latent that rarely fires has a small spread, but one firing of it moves
# its mean by 1 / tokens of its value: scaled so, it does not outrank a latent that comes back on
# many tokens. At least one firing's spread (at the median value of all): a latent that never
# fired there does not top every list by firing once.
def spread_of(codes, n, rows):
    m1, m2 = (np.bincount(codes.lat, codes.vals.astype(float) ** q, n) / rows for q in (1, 2))
    var = np.maximum(m2 - m1 * m1, np.median(codes.vals) ** 2 / rows)
    return torch.from_numpy(np.sqrt(var)).float()

# A latent's top tokens: the 3 most common at its 20 largest activations in the capture.
def top_tokens(codes, cap, tok, k):
    rows = rows_by_value(codes, k)[:20]
    return [t for t, _ in Counter(tok.batch_decode(cap['tokens'][rows][:, None])).most_common(3)]

# CALIBRATION random directions of a latent's norm (from the seed), each pushed as a latent is and
# judged against each latent of `chosen` in turn: per latent, its p-values where the push is not its
# own (its false verdicts, as often as the protocol gives them), and its mean re-detection.
def calibrate(push, sae, pushes, seed, base, spread, chosen):
    g = torch.Generator().manual_seed(seed)
    null = {str(i): {'p': [], 'redetect': []} for i in chosen}
    for _ in range(CALIBRATION):
        d = torch.randn(sae.W_dec.shape[1], generator=g).to(sae.W_dec)
        run = push([lambda h, v=v * d / d.norm(): h + v for v in pushes])
        for i in chosen:
            p, *_, redetect = judge_push(i, run, base, spread)
            null[str(i)]['p'] += [p]
            null[str(i)]['redetect'] += [redetect.tolist()]
    return null

# Benjamini-Hochberg: the p-values that are discoveries with the false-discovery rate held at FDR:
# all those up to the largest p_(k) <= FDR * k / m.
def discoveries(ps):
    s = np.sort(ps)
    ok = np.nonzero(s <= FDR * np.arange(1, len(s) + 1) / len(s))[0]
    return np.asarray(ps) <= (s[ok[-1]] if len(ok) else -1)

# The 95% Wilson interval of a share of k in m.
def wilson(k, m, z=1.96):
    c, h = k + z * z / 2, z * math.sqrt(k * (m - k) / m + z * z / 4)
    return [round(x / (m + z * z), 4) for x in (c - h, c + h)]

# verify.json's verdicts and summary: Benjamini-Hochberg over the latents tested, each verdict with
# its false rate (how often a random direction in the latent's place gives a p-value within the
# cut); the protocol's false rate, Benjamini-Hochberg over each random direction's p-values in all
# the latents' places (the calibration).
def verdicts(results, null, n):
    ps = [v['p'] for v in results.values()]
    ok = discoveries(ps)
    cut = max(np.array(ps)[ok], default=-1)
    for v, o, nl in zip(results.values(), ok, null.values()):
        v.update(verified=bool(o), false_rate=float(np.mean(np.array(nl['p']) <= cut)),
                 redetect_random=np.mean(nl['redetect'], 0).tolist())
    k, m = int(ok.sum()), len(ps)
    false = int(sum(discoveries([v['p'][r] for v in null.values()]).sum()
                    for r in range(CALIBRATION)))
    return {'latents': m, 'verified': k, 'share_95': wilson(k, m),
            'false_rate': float(false / (m * CALIBRATION)),
            'false_rate_95': wilson(false, m * CALIBRATION),
            'median_rank': float(np.median(ps)) * n}

# -----------------------------------------------------------------------------
# the LLM client: answer cache, local and endpoint backends, retries, threads (skip on a first read)

# Every model call's answer, keyed by a hash of its request: a dict, and the same answers as JSON
# lines appended to cache.jsonl as they come (the file is returned open for that). A killed
# run resumes without asking again; a rerun is exact and free; a line cut by a kill is skipped.
def load_cache(path):
    cache = {}
    for line in open(path, encoding='utf-8') if os.path.exists(path) else []:
        try:
            e = json.loads(line)
            cache[e['key']] = e['answer']
        except (ValueError, KeyError):
            pass
    return cache, open(path, 'a', encoding='utf-8')

def cache_key(request):
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

CACHE_LOCK = threading.Lock()  # keeps the threads' lines whole in the file

# The answer to `request` (any JSON): from the cache, or from ask(), then stored and flushed (a
# kill loses at most the answers still in flight).
def cached(cache, log, request, ask):
    key = cache_key(request)
    if key not in cache:
        answer = ask()
        with CACHE_LOCK:
            log.write(json.dumps({'key': key, 'answer': answer}) + '\n')
            log.flush()
            cache[key] = answer
    return cache[key]

# A local instruct model as the explainer: chat(messages, max_tokens) -> its greedy answer, and
# judge(explanation, texts) -> P(yes) per text, read off the next-token logits after each
# DETECT_ONE prompt (no parsing: 'yes' against 'no'), batch_size prompts at a time.
def local_backend(name, lm, tok, cache, log, batch_size):
    if not tok.chat_template:
        raise SystemExit(f"--explainer={name} has no chat template: pass an instruct (chat) "
                         f"model, or an endpoint URL with --explainer_model")
    # 'yes' and 'no' as the first token of an answer, in the spellings that are one token
    def ids(*words):
        found = [tok.encode(w, add_special_tokens=False) for w in words]
        return [t[0] for t in found if len(t) == 1]
    yes, no = ids('yes', 'Yes', ' yes', ' Yes'), ids('no', 'No', ' no', ' No')
    dev = lm.device

    # the text a chat model reads for a conversation, up to where its answer starts
    def prompt(messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def chat(messages, max_tokens):
        # greedy: the same answer on every machine that computes alike
        def ask():
            x = tok(prompt(messages), add_special_tokens=False,
                    return_tensors='pt').input_ids.to(dev)
            out = lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=tok.eos_token_id)
            return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
        return cached(cache, log, {'model': name, 'messages': messages, 'max_tokens': max_tokens},
                      ask)

    @torch.no_grad()
    def judge(explanation, texts):
        asks = {t: {'model': name, 'p_yes': prompt([{'role': 'user', 'content': DETECT_ONE.format(
            explanation=explanation, text=t)}])} for t in texts}
        # only the texts not answered yet reach the model, each prompt tokenized whole (as it would
        # be alone) and right-padded in a batch: its logits at its last token
        todo, p = [t for t in asks if cache_key(asks[t]) not in cache], {}
        for j in range(0, len(todo), batch_size):
            rest = [np.array(tok(asks[t]['p_yes'], add_special_tokens=False).input_ids)
                    for t in todo[j:j + batch_size]]
            ids, mask = pad(rest, dev)
            # logits only from the shortest row's last token on (the unembedding is a fifth of a
            # small model's compute): row r's last token is then at len(r) - 1 - start
            start = min(map(len, rest)) - 1
            logits = lm(input_ids=ids, attention_mask=mask,
                        logits_to_keep=ids.shape[1] - start).logits
            last = logits[torch.arange(len(rest)), [len(r) - 1 - start for r in rest]]
            logp = last.float().log_softmax(-1)
            # P(yes) / (P(yes) + P(no)), each summed over its spellings
            for t, lp in zip(todo[j:j + batch_size], logp):
                p[t] = torch.sigmoid(lp[yes].logsumexp(0) - lp[no].logsumexp(0)).item()
        # each answer stored under its own prompt: a resumed run asks only what is missing
        return [cached(cache, log, asks[t], lambda: p[t]) for t in texts]
    return chat, judge

# An OpenAI-compatible chat-completions endpoint (Ollama, vLLM, llama.cpp's server, OpenAI, ...)
# as the explainer, with the standard library alone: the same two functions. The key comes from
# the environment variable key_env and is sent only when it is set. 429 and 5xx are retried with
# backoff (the server's Retry-After when it gives one); anything else is one line.
def http_backend(url, model, key_env, cache, log, timeout):
    url = url.rstrip('/')
    # local servers need no key: none is sent, not even an empty one
    headers = {'Content-Type': 'application/json'}
    if os.environ.get(key_env):
        headers['Authorization'] = f'Bearer {os.environ[key_env]}'

    # one POST, its answer's text
    def post(body):
        # five tries at most: waits of 1, 2, 4, 8 s between them
        for attempt in range(5):
            # the same request each try: the cache keys it, the server sees it again
            req = urllib.request.Request(f'{url}/chat/completions', json.dumps(body).encode(),
                                         headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return json.load(r)['choices'][0]['message']['content'] or ''
            # the server answered with an error status (HTTPError before URLError: it is one)
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    have = 'is set' if key_env in os.environ else 'is not set'
                    raise SystemExit(f"{url} refused the request (HTTP {e.code}): put a valid key "
                                     f"in the environment variable {key_env} (it {have}), or "
                                     f"name another with --api_key_env")
                if attempt == 4 or e.code != 429 and e.code < 500:
                    what = ' '.join(e.read().decode(errors='replace').split())[:160]
                    raise SystemExit(f"{url} answered HTTP {e.code} ({what}): check "
                                     f"--explainer_model={model} is a model it serves")
                # rate-limited or overloaded: the server's Retry-After seconds (at most a minute)
                wait = e.headers.get('Retry-After') or ''
                time.sleep(min(60.0, float(wait) if wait.isdigit() else 2.0 ** attempt))
            # no answer at all: refused, unknown host, timed out
            except (urllib.error.URLError, OSError) as e:
                raise SystemExit(f"no answer from {url}/chat/completions "
                                 f"({getattr(e, 'reason', e)}): check that the server runs and "
                                 f"that the URL ends in /v1 (Ollama: http://localhost:11434/v1)")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise SystemExit(f"{url} answered something that is not a chat completion "
                                 f"({type(e).__name__}: {e}): is it OpenAI-compatible?")

    # temperature 0 and a seed: as reproducible as the server allows
    def chat(messages, max_tokens):
        body = {'model': model, 'messages': messages, 'temperature': 0, 'max_tokens': max_tokens,
                'seed': 0}
        return cached(cache, log, {'url': url, **body}, lambda: post(body))

    # five texts per request; an answer that is not a list of five 0/1 gives None for each
    def judge(explanation, texts):
        out = []
        for j in range(0, len(texts), 5):
            # numbered and quoted: the answer's list follows the numbers
            group = texts[j:j + 5]
            numbered = '\n'.join(f'{n + 1}. "{t}"' for n, t in enumerate(group))
            text = DETECT_MANY.format(explanation=explanation, texts=numbered)
            # the first [...] of 0s and 1s in the answer, however much text is around it
            found = re.search(r'\[[\d\s,]*\]', chat([{'role': 'user', 'content': text}], 30))
            got = json.loads(found.group()) if found else []
            # a list of another length or with other values is not guessed at
            ok = len(got) == len(group) and set(got) <= {0, 1}
            out += [float(x) for x in got] if ok else [None] * len(group)
        return out
    return chat, judge

# fn over items, `workers` at a time (threads: they wait on the network), in order, with the
# stage's progress; on an error (a SystemExit from a worker) the queued work is dropped, not run
# to the end
def parallel(fn, items, workers, stage):
    pool = ThreadPoolExecutor(workers)
    try:
        return list(progress(stage, pool.map(fn, items), len(items)))
    finally:
        pool.shutdown(cancel_futures=True)

# The explainer's two functions and how to read them: (chat, judge, P(yes) or 0/1 answers, threads)
# from an endpoint (an http(s) URL: text answers only, requests_in_flight at a time) or a local
# model (the SAE's own, loaded already, or another in the same dtype; one call at a time: a forward
# pass already uses every core).
def make_backend(name, model, key_env, in_flight, timeout, lm, tok, cache, log, batch_size, dtype,
                 device, own):
    if name.startswith(('http://', 'https://')):
        if not model:
            raise SystemExit(f"--explainer={name} is an endpoint: name the model it serves with "
                             f"--explainer_model=, e.g. llama3.1:8b (Ollama)")
        return (*http_backend(name, model, key_env, cache, log, timeout), False, in_flight)
    xlm, xtok = (lm, tok) if name == own else load_model(name, device, dtype)
    return (*local_backend(name, xlm, xtok, cache, log, batch_size), True, 1)

# -----------------------------------------------------------------------------
# dashboard (--browse) -> browser.html, browser.json (skip on a first read)

# the window shown around a firing token: 8 tokens before it and 3 after
BEFORE, AFTER = 8, 3
# a latent's activation histogram: log2 bins, 4 per octave from 2^-10 (the last takes the rest)
N_BINS = 96

# Per latent, from the codes: how many rows it fires on, a histogram of those activations, and two
# lists of its codes (indices into the flat codes): its E largest activations, largest first (ties
# in row order), and R spread evenly over all of them by rank, smallest first.
@torch.no_grad()
def scan(codes, n, E, R):
    v, lat = torch.from_numpy(codes.vals), torch.from_numpy(codes.lat).long()
    # log2 bins, 4 per octave from 2^-10; anything smaller goes in the first bin
    bins = ((v.log2() + 10) * 4).floor().clamp(0, N_BINS - 1).long()
    hist = torch.bincount(lat * N_BINS + bins, minlength=n * N_BINS).view(n, N_BINS)
    # how many rows each latent fires on (a row holds a latent once)
    count = hist.sum(1).tolist()
    # by value, largest first, then stably by latent: each latent's codes are one segment, in order
    o = v.argsort(descending=True, stable=True)
    o = o[lat[o].argsort(stable=True)]
    starts = np.cumsum([0] + count[:-1])
    # (R ranks evenly spaced, or all of them when fewer)
    return torch.tensor(count), hist, ([o[s:s + min(c, E)] for s, c in zip(starts, count)],
                                       [o[s + c - 1 - np.unique(np.arange(R) * c // R)]
                                        for s, c in zip(starts, count)])

# The page's example c (a code, on row r) of latent i, from the codes as numpy arrays:
# the window of rows around r within its context (with the context's token 0 when the capture did
# not store it) as indices into the page's token table (`vocab`, token id -> index, which grows as
# tokens come), the latent on each token in tenths of `big` (its largest value: OpenAI's explainer
# scale), the firing token's place, and its value.
def page_example(c, i, codes, cap, big, vocab):
    r = int(codes.row[c])
    rows = window(r, cap, BEFORE, AFTER)
    ids, acts, at = cap['tokens'][rows].tolist(), latent_on(codes, i, rows), r - int(rows[0])
    # the window reaches the start of a context whose token 0 is not a row
    if cap['pos'][rows[0]] == 1:
        ids, acts, at = [int(cap['first'][cap['ctx'][r]])] + ids, np.r_[0, acts], at + 1
    return [[vocab.setdefault(t, len(vocab)) for t in ids],
            np.rint(10 * acts / big).astype(int).tolist(), at, round(float(codes.vals[c]), 3)]

# Write the dashboard beside the SAE: browser.html (one static page, open from disk) and the same
# data as browser.json for programs. Every live latent: density, activation histogram, top and
# examples over its range, logit effects, its explanation and scores (from interp.json); and the
# SAE's overview: config, evaluation, training curves, densities.
def dashboard(lm, tok, sae, info, folder, cap, codes, n_show, E, R=10):
    n = sae.W_dec.shape[0]
    count, hist, sets = scan(codes, n, E, R)
    # live latents only: a latent that never fired has nothing to show
    live = torch.nonzero(count).flatten()[:n_show or None]
    up, down = logit_effects(lm, sae, live)
    # the page's token table, in order of first use
    vocab, cards = {}, []
    for j, i in enumerate(progress('dashboard: examples', live.tolist())):
        top, sample = (s[i].tolist() for s in sets)
        big = float(codes.vals[top[0]])
        # the histogram from its first to its last nonempty bin (the page labels both ends)
        nz = torch.nonzero(hist[i]).flatten().tolist()
        cards.append({'i': i, 'count': count[i].item(),
                      'hist': [nz[0], hist[i, nz[0]:nz[-1] + 1].tolist()],
                      'top': [page_example(c, i, codes, cap, big, vocab) for c in top],
                      'spread': [page_example(c, i, codes, cap, big, vocab) for c in sample],
                      'promotes': [vocab.setdefault(t, len(vocab)) for t in up[j]],
                      'suppresses': [vocab.setdefault(t, len(vocab)) for t in down[j]]})
    # training's validation curve (metrics.jsonl's eval lines: FVU and dead against tokens seen)
    path = folder / 'metrics.jsonl'
    logged = [json.loads(line) for line in open(path)] if path.exists() else []
    # everything the page shows, and browser.json for programs: the SAE's numbers from training
    # and eval.json, and what --explain wrote, as they are (the page picks from them)
    data = {'model': info['model'], 'hook': info['hook'], 'n_latents': n, 'k': sae.k,
            'rows': len(cap['ctx']),
            'arch': sae.arch, 'ends': sae.ends, 'dead': int((count == 0).sum()),
            'eval': {**info.get('eval', {}), **read_json(folder / 'eval.json')},
            'curve': [r['eval'] for r in logged if 'eval' in r],
            'interp': read_json(folder / 'interp.json'),
            'verify': read_json(folder / 'verify.json'),
            'vocab': [tok.decode([t]) for t in vocab],
            'config': {'sae': info['config'], 'capture': info['capture']['config']},
            'latents': cards}
    text = json.dumps(data, separators=(',', ':'))
    # '</' inside a script element would end it early
    page = PAGE.replace('DATA', text.replace('</', '<\\/'))
    write_file(folder / 'browser.html', page)
    write_file(folder / 'browser.json', text)
    print(f"wrote {folder}/browser.html ({len(text) / 1e6:.1f} MB of data) and browser.json: "
          f"{len(cards)} live latents of {n}")

# The page renders from the JSON embedded in it, with no server and no external asset: plain DOM
# and inline SVG, so that a reader can change it without a toolchain.
PAGE = '''<!doctype html><meta charset="utf-8"><title>nanoSAE dashboard</title>
<style>
body { font: 14px sans-serif; margin: 1.5em } nav { position: sticky; top: 0; background: #fff }
#main { display: flex; gap: 1.5em } #list { width: 14em; height: 80vh; overflow: auto }
.ex { font-family: monospace; white-space: pre } .peak { outline: 1px solid #c60 }
svg { display: block; margin: .3em 0 1em }
</style>
<h1 id="title"></h1><div id="overview"></div>
<nav>latent <input id="jump" type="number"> <button id="prev">&lt;</button>
<button id="next">&gt;</button> sort by <select id="sort"><option>index</option>
<option>density</option><option>score</option><option>p</option></select>
<input id="q" placeholder="filter"> <span id="shown"></span></nav>
<div id="main"><ol id="list"></ol><div id="card"></div></div>
<script type="application/json" id="data">DATA</script>
<script>
// elements by their id: the browser makes each id a global (data, title, card, list, ...)
const D = JSON.parse(data.textContent), byId = new Map(D.latents.map(l => [l.i, l]))
// each latent's density (its share of the capture's rows) and largest value (its top example's)
for (const l of D.latents) [l.density, l.max] = [l.count / D.rows, l.top[0][3]]
const esc = s => String(s).replace(/[&<>"]/g, c => '&#' + c.charCodeAt(0) + ';')
const toks = ts => ts.map(t => `<code>${esc(D.vocab[t])}</code>`).join(' ')
// bars: one rect per count, keeping it in data-count; the two ends labelled below
function bars(counts, left, right, w = 420, h = 80) {
  const top = Math.max(...counts, 1)
  return `<svg width="${w}" height="${h + 14}">` + counts.map((c, j) => `<rect data-count="${c}"
    x="${j * w / counts.length}" y="${h - h * c / top}" width="${w / counts.length * .9}"
    height="${h * c / top}" fill="#c60"/>`).join('') + `<text y="${h + 12}">${left}</text>` +
    `<text x="${w}" y="${h + 12}" text-anchor="end">${right}</text></svg>`
}
// lines of ys against xs on one scale, the first orange and a second (a control) grey; the y
// range in the title, the x ends labelled below
function chart(name, xs, series, left, right, w = 300, h = 60) {
  const all = series.flat(), lo = Math.min(...all), hi = Math.max(...all), xm = Math.max(...xs)
  return `<p>${name}: ${+lo.toPrecision(3)} to ${+hi.toPrecision(3)}</p><svg width="${w}" ` +
    `height="${h + 14}">` + series.map((ys, s) => `<polyline fill="none" stroke="${['#c60',
    '#999'][s]}" points="${xs.map((x, j) => `${w * x / xm},${h - h * (ys[j] - lo) /
    (hi - lo || 1)}`)}"/>`).join('') + `<text y="${h + 12}">${left}</text><text x="${w}" ` +
    `y="${h + 12}" text-anchor="end">${right}</text></svg>`
}
// an example: every token shaded by the latent's activation on it, the firing token outlined
const example = ([ids, acts, at, value]) => '<div class="ex">' + ids.map((t, j) =>
  `<span style="background:rgba(255,140,0,${acts[j] / 10})"` + (j == at ? ` class="peak"
  data-act="${value}"` : '') + `>${esc(D.vocab[t])}</span>`).join('') + '</div>'
// a latent's explanation and its detection scores (interp.json), if --explain ran on it; a
// score is the AUROC where the scorer gave P(yes), else balanced accuracy
const expl = i => (D.interp.latents || {})[i] || {}
const score = (i, k = 'llm') => { const s = (expl(i).scores || {})[k]
  return s ? s.auroc ?? s.balanced_accuracy : null }
// a latent's verification by steering (verify.json), if --verify ran on it
const verified = i => (D.verify.latents || {})[i]
// the SAE as a whole, at a glance: its numbers in groups with their units (what a stage did not
// compute is left out), the validation curves, its latents' densities (log10, in quarter decades
// from 1e-7), the config
function drawOverview() {
  title.textContent = `${D.model}, ${D.hook}: ${D.n_latents} latents, ${D.arch}, k=${D.k}`
  const E = D.eval, V = D.verify.summary || {}, det = D.interp.summary || {}, pct = x => 100 * x
  const groups = {'reconstruction, validation rows': [['FVU', E.fvu], ['dead latents', E
    .dead_frac, '%', pct]], 'the model with the SAE spliced in, unseen text': [['loss recovered' +
    ' (against zero-ablation)', E.loss_recovered_pct, '%'], ['loss recovered (against mean-' +
    'ablation)', E.loss_recovered_vs_mean_pct, '%'], ['CE increase', E.delta_ce, 'nats/token'],
    ['KL(clean || spliced)', E.kl, 'nats/token'], ['CE clean', E.ce_clean, 'nats/token']],
    'sparsity': [['L0 in training (validation)', E.l0, 'latents/token'], ['L0 at inference',
    E.l0_inference, 'latents/token'], ['never fired in the capture', D.dead, 'latents']],
    'probes, test documents (chance 0.5)': [1, 5].flatMap(k => [[`top-${k} SAE latents`,
    E[`probe_sae_top${k}`], 'accuracy'], [`top-${k} residual dimensions`,
    E[`probe_residual_top${k}`], 'accuracy']]).concat([['all residual dimensions',
    E.probe_residual_full, 'accuracy']]), 'interpretation': Object.entries(det).map(([k, s]) =>
    [`detection, ${k} explanations`, s.auroc_mean ?? s.mean, 'AUROC or balanced accuracy'])
    .concat([['verified by steering (FDR 5%)', V.verified / V.latents, `% of ${V.latents}`, pct],
    ['random directions verified (the false rate)', V.false_rate, '%', pct], ['median rank of ' +
    'the pushed latent (its rise)', V.median_rank, `of ${D.n_latents} latents`]])}
  const tokens = D.curve.map(r => r.tokens)
  overview.innerHTML = '<table>' + Object.entries(groups).map(([g, rows]) =>
    `<tr><th colspan="3">${g}` + rows.filter(r => r[1] != null && !isNaN(r[1])).map(([k, v, u,
    f = x => x]) => `<tr><td>${k}<td>${+f(v).toPrecision(4)}<td>${u || ''}`).join('')).join('') +
    '</table>' + (tokens.length ? chart('FVU on the validation rows', tokens, [D.curve.map(r =>
    r.fvu)], 0, `${tokens.at(-1)} tokens seen`) : '') + 'live latents by log10 density' +
    bars(hist(), '1e-7', '1') +
    `<details><summary>config</summary><pre>${esc(JSON.stringify(D.config, null, 1))}</pre>`
}
function hist() {
  const h = new Array(28).fill(0)
  for (const l of D.latents) h[Math.min(27, Math.floor((Math.log10(l.density) + 7) * 4))]++
  return h
}
// the verdict and its p (the latent's rank among all latents' rises at the chosen strength);
// against strength: the rank (log10), the re-detection beside a random direction's (grey) and
// the first token's KL; what rose at the chosen strength (latents, by their top tokens, and
// tokens); three prompts' texts unsteered and at each strength
function drawVerify(i) {
  const v = verified(i), S = D.verify.settings?.strengths, x = s => `x${s}`
  if (!v) return ''
  const plot = (name, ys) => chart(name, S, ys, x(S[0]), x(S.at(-1)))
  return `<h3 class="verdict">steering: ${v.verified ? 'verified' : 'not verified'}</h3>` +
    `<p>p = <span class="p">${+v.p.toPrecision(3)}</span>: rank ${v.rank[v.strength]} of ` +
    `${D.n_latents} at ${x(S[v.strength])}; a random direction in its place is within the cut ` +
    `${(100 * v.false_rate).toFixed(1)}% of the time</p>` +
    plot('rank of its rise, log10', [v.rank.map(Math.log10)]) +
    plot('re-detection (share of new tokens)', [v.redetect, v.redetect_random]) +
    plot('KL of the first new token, nats', [v.kl]) + '<p class="rose">rose most: ' +
    v.rose.map(([k, r, ts]) => `<a href="#${k}">${k}</a> (${ts.map(t => `<code>${esc(t)}` +
    '</code>').join(' ')}) +${r.toFixed(2)} sd`).join(', ') + '<br>tokens: ' +
    v.tokens.map(([t, s]) => `<code>${esc(t)}</code> ${(100 * s).toFixed(1)}%`).join(', ') +
    '</p><ol class="samples">' + v.samples.map((ts, j) => `<li>${j ? x(S[j - 1]) :
    'unsteered'}: ` + ts.map(t => `<span class="ex">${esc(t)}</span>`).join(' | ')).join('') +
    '</ol>'
}
// a latent's card: density, histogram of its activations, examples, explanation, logit effects
function drawCard(i) {
  const l = byId.get(i), edge = b => (2 ** (b / 4 - 10)).toPrecision(2)
  jump.value = i
  if (!l) return card.innerHTML = `<h2>latent ${i}</h2>dead or absent: it never fired`
  // matryoshka: the latent's group g, latents ends[g - 1]..ends[g] - 1, and so the smallest
  // prefix that holds it (prefix g is groups 0..g)
  const g = D.ends.findIndex(e => i < e), group = D.arch != 'matryoshka' ? '' :
    `<p class="group">matryoshka group ${g}: latents ${g ? D.ends[g - 1] : 0}..${D.ends[g] - 1}` +
    '</p>'
  card.innerHTML = `<h2 data-latent="${i}">latent ${i}</h2><p>density ${(100 * l.density)
    .toPrecision(3)}% (${l.count} activations), max ${l.max}</p>` + group +
    (expl(i).explanation == null ? ''
    : `<p>explanation: <b class="expl">${esc(expl(i).explanation)}</b><br>detection, AUROC or ` +
    `balanced accuracy (chance 0.5): <span class="score">${score(i)}</span> (token baseline ` +
    `${score(i, 'token')}, random explanation ${score(i, 'random')})</p>`) +
    drawVerify(i) + 'nonzero activations, log scale' +
    bars(l.hist[1], edge(l.hist[0]), edge(l.hist[0] + l.hist[1].length)) +
    '<h3>top activations</h3>' + l.top.map(example).join('') + '<h3>over the range, smallest ' +
    'first</h3>' + l.spread.map(example).join('') +
    `<p>promotes ${toks(l.promotes)}<br>suppresses ${toks(l.suppresses)}</p>`
}
// the list: the live latents whose examples hold the filter's text, in the chosen order
for (const l of D.latents) l.text = l.top.concat(l.spread).map(e => e[0].map(t =>
  D.vocab[t]).join('')).join(' ').toLowerCase()
let order = []
function drawList() {
  const key = {index: l => l.i, density: l => -l.density, score: l => -(score(l.i) ?? -1),
    p: l => verified(l.i)?.p ?? 2}[sort.value]
  order = D.latents.filter(l => l.text.includes(q.value.toLowerCase()))
    .sort((a, b) => key(a) - key(b)).map(l => l.i)
  list.innerHTML = order.map(i => `<li><a href="#${i}">${i}</a> ` +
    (100 * byId.get(i).density).toPrecision(2) + '% ' + (score(i) ?? '') + ' ' +
    (verified(i)?.p ?? '')).join('')
  shown.textContent = `${order.length} of ${D.latents.length} live latents`
}
const show = () => drawCard(location.hash.length > 1 ? +location.hash.slice(1) : order[0])
const step = d => location.hash = order[Math.max(0, Math.min(order.length - 1,
  order.indexOf(+jump.value) + d))]
sort.value = new URLSearchParams(location.search).get('sort') || 'index'
sort.onchange = q.oninput = () => { drawList(); show() }
jump.onchange = () => location.hash = jump.value
prev.onclick = () => step(-1)
next.onclick = () => step(1)
onhashchange = show
drawOverview()
drawList()
show()
</script>
'''

# -----------------------------------------------------------------------------
# plumbing: progress lines, the checks of the arguments that need the SAE (skip on a first read)

# The items, one at a time, and a progress line for the stage after each one that ends 10 s or more
# after the last line: done of total, the time so far and an ETA (and one at the end of a stage
# that took 10 s or more).
def progress(stage, items, total=0):
    total, t0, said = total or len(items), time.time(), time.time()
    for done, x in enumerate(items, 1):
        yield x
        now = time.time()
        if now - said >= 10 or done == total and now - t0 >= 10:
            said, eta = now, (now - t0) / done * (total - done)
            print(f"{stage}: {done}/{total} | {now - t0:.0f}s | ETA {eta:.0f}s", flush=True)


# --latent in range; --latents as latent indices (choose checks later that each can be explained).
def check_latents(latent, latents, n):
    # (rules has checked latent >= -1)
    if latent >= n:
        raise SystemExit(f"--latent={latent} is out of range: this SAE has latents 0..{n - 1}")
    which = [s.strip() for s in latents.split(',') if s.strip()]
    if not all(s.isdigit() and int(s) < n for s in which):
        raise SystemExit(f"--latents={latents}: valid is a comma-separated list of latents in "
                         f"0..{n - 1}, e.g. --latents=3,17,42")
    return [int(s) for s in which]

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    t_start = time.time()
    # every key checked before anything is loaded
    config = configure(globals(), config_keys, rules)
    if any(a.startswith('--prompt=') for a in sys.argv[1:]) and not prompt.strip():
        raise SystemExit("--prompt is empty: give some text, e.g. --prompt=\"The capital of "
                         "France is\"")
    device = pick_device(device)
    # the SAE, and its capture, model and block (all named in the SAE's file)
    sae, info = load_sae(sae_path, device)
    n, d = sae.W_dec.shape
    # --latent, --latents against this SAE, before the model loads
    which = check_latents(latent, latents, n)

    # -------------------------------------------------------------------------
    # the stages this run does, all decided here. --prompt alone only reads (inspect, or steer
    # with --latent). With no stage named: evaluate and browse, and probe when the capture has
    # labels. --latents alone explains them. The stages that read the capture (probe, explain,
    # verify, browse) check it now, before the model loads; evaluate and verify need text the SAE
    # never saw (the default corpus's unseen articles, or --data); a run that writes beside the
    # SAE holds its folder (a second one refuses, as with capture.py and sae.py).
    explain = explain or bool(which and not verify)
    default = not (evaluate or browse or prompt or probe or explain or verify)
    evaluate, browse = evaluate or default, browse or default
    cap_dir = Path(info['data_dir'])
    reads = probe or explain or verify or browse
    meta = check_capture(cap_dir, info) if reads else {}
    probe = probe or default and bool(meta['labels'])
    if probe and not meta['labels']:
        raise SystemExit(f"--probe needs document labels, and '{cap_dir}' has none: capture a "
                         f".jsonl whose lines carry a \"label\" (a class per document), or "
                         f"the default --data=wiki (topics)")
    if (evaluate or verify) and not data and info['capture']['corpus'] != 'wiki':
        raise SystemExit("--data= is needed: text the SAE did not train on (.txt, folder, "
                         ".jsonl)")
    folder = Path(sae_path) if os.path.isdir(sae_path) else Path(sae_path).parent
    if evaluate or reads:
        lock_file = lock(folder, 'copy the folder and pass --sae_path=<the copy>')

    # -------------------------------------------------------------------------
    # the model by the name stored in the SAE (an HF id, a local folder or a GGUF file)
    dtype, why = pick_dtype(dtype, device)
    lm, tok = load_model(info['model'], device, dtype)
    if lm.config.hidden_size != d:
        raise SystemExit(f"the SAE's d_model {d} does not match {info['model']}'s "
                         f"{lm.config.hidden_size}: pass the SAE trained on it")
    print(f"the model and the encoder's products in {dtype} ({why}; --dtype= to choose)")
    # the block whose output the SAE reads and, when steering, writes; the positions the capture
    # excluded are never changed nor scored; strengths count in the residual's median norm
    block = blocks(lm)[1][info['layer']]
    skip, unit = int(info['capture']['config']['exclude_first']), info['median_norm']

    # -------------------------------------------------------------------------
    # --prompt: the latents on each token, or the prompt completed without and with a push
    ids = tok(prompt, return_tensors='pt').input_ids.to(device)
    if prompt and latent == -1:
        inspect(lm, tok, block, sae, ids, skip, top_latents)
    elif prompt:
        # the same noise for both, and a hook on both (the clean one changes nothing): any
        # difference comes from the steering
        clean, steered = tok.batch_decode(complete(
            lm, block, sae, ids, skip, temperature, seed, max_new_tokens,
            [lambda h: h, steer_fn(sae, latent, strength * unit, mode)])[3][:, 0],
            skip_special_tokens=True)
        print(f"latent {latent}, {mode} {strength} x {unit:.3g} (the residual's median norm)\n"
              f"--- clean ---\n{prompt}{clean}\n--- steered ---\n{prompt}{steered}")

    # -------------------------------------------------------------------------
    # evaluate on text the SAE never saw; eval.json: each stage adds its numbers to the others'
    ev = read_json(folder / 'eval.json')
    unseen = read_docs(data or 'wiki', 'unseen')[0] if evaluate or verify else []
    if evaluate:
        # the same contexts as capture cuts, so the same positions are skipped
        ctxs, _ = contexts(tok, unseen, info['ctx_len'], eval_tokens, skip)
        ev.update(evaluate_lm(lm, block, sae, ctxs, skip, batch_size, device))

    # -------------------------------------------------------------------------
    # codes: every row of the capture encoded once, for all that follows
    if reads:
        codes, cap = encode_all(sae, cap_dir / 'acts.npy', dtype), read_capture(cap_dir)
        # L0 at inference: batchtopk and matryoshka keep what is above theta, not exactly k
        ev['l0_inference'] = round(len(codes.vals) / meta['N'], 2)
    # probe: a capture too small for any class (a few thousand tokens) has nothing to report
    if probe:
        ev.update(probe_capture(sae, meta, cap, codes, cap_dir / 'acts.npy'))
    # eval.json's numbers, this run's and the earlier stages'
    if evaluate or reads:
        write_file(folder / 'eval.json', ev)
        print('\n'.join(f"{k:28s} {v:.4f}" for k, v in ev.items() if isinstance(v, (int, float))))

    # -------------------------------------------------------------------------
    # the explainer: a local model (the SAE's own by default) or an endpoint; every answer (and
    # every verify result) cached beside the SAE
    name = explainer or info['model']
    if explain or verify:
        cache, log = load_cache(folder / 'cache.jsonl')
    if explain:
        backend = make_backend(name, explainer_model, api_key_env, requests_in_flight, timeout,
                               lm, tok, cache, log, batch_size, dtype, device, info['model'])
    # explain: the SAE's tokenizer decodes the snippets; the explainer tokenizes them again
    if explain:
        chosen = choose(codes, cap, n, explain, which, seed, 'explain')
        report = interpret(sae, meta, cap, codes, tok, backend, chosen, seed)
        report.update(explainer=name, explainer_model=explainer_model or None)
        write_file(folder / 'interp.json', report)
        print('\n'.join(f"{k:6s} explanations: {s}" for k, s in report['summary'].items()))
        print(f"{report['failed_explanations']} explanations failed (they repeated the prompt or "
              f"copied a text, twice); wrote {folder}/interp.json")

    # -------------------------------------------------------------------------
    # verify: push each latent and let the SAE judge what the model writes; the calibration and
    # each latent's result are cached as they come (a killed run continues), verify.json last
    if verify:
        # the prompts: the first tokens of unseen articles, spread over them (an article's start
        # names its subject, and little else yet)
        ids = [x[:PROMPT_TOKENS] for x in tok(unseen).input_ids if len(x) >= PROMPT_TOKENS]
        if len(ids) < PROMPTS:
            raise SystemExit(f"--verify needs {PROMPTS} unseen documents of {PROMPT_TOKENS}+ "
                             f"tokens, and --data={data} has {len(ids)}: give it more text")
        prompts = torch.tensor(ids[::len(ids) // PROMPTS][:PROMPTS], device=device)
        chosen = choose(codes, cap, n, verify, which, seed, 'verify')
        # every result is cached under these: a rerun with the same ones asks nothing again
        settings = {'prompts': tok.batch_decode(prompts), 'strengths': STRENGTHS, 'seed': seed,
                    'temperature': temperature, 'dtype': dtype,
                    'sae_checksum': sae.W_dec.sum().item(),
                    'constants': [NEW_TOKENS, KL_BUDGET, CALIBRATION]}
        # the prompts continued with hooks: unsteered, then pushed
        push = functools.partial(complete, lm, block, sae, prompts, skip, temperature, seed,
                                 NEW_TOKENS)
        pushes, spread, base = [s * unit for s in STRENGTHS], \
            spread_of(codes, n, meta['N']).to(device), push([lambda h: h])
        null = cached(cache, log, {'verify': settings, 'calibration': chosen}, lambda: calibrate(
            push, sae, pushes, seed, base, spread, chosen))
        results = {}
        for i in progress('verify: latents', chosen):
            results[str(i)] = cached(cache, log, {'verify': settings, 'latent': i}, lambda: (
                verify_latent(push, tok, sae, i, pushes, base, spread, codes, cap)))
        summary = verdicts(results, null, n)
        write_file(folder / 'verify.json',
                   {'settings': settings, 'latents': results, 'summary': summary})
        print(f"wrote {folder}/verify.json: {summary}")

    # -------------------------------------------------------------------------
    # dashboard
    if browse:
        dashboard(lm, tok, sae, info, folder, cap, codes, browse_latents, n_examples)
    print(f"steer.py done in {time.time() - t_start:.0f}s")
