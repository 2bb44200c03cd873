"""
Train a TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") on the
activations that capture.py wrote, and save it as safetensors (SAELens layout) that steer.py loads by path.
$ python sae.py                                     # data/smollm2-l15 -> out/smollm2-l15
$ python sae.py --data_dir=data/llama1b-l8 --out_dir=out/llama1b-l8 --expansion=32 --k=64 --max_iters=25000 --device=cuda
$ torchrun --standalone --nproc_per_node=4 sae.py --device=cuda     # DDP; batch_size is per process
$ python sae.py --bench=True --data_dir=synthetic --max_iters=200   # speed: activations/s, peak memory, ratio to x @ W_enc
Kill it at any point and rerun the same command: it resumes from out_dir/ckpt.pt.
"""
import os, sys, json, math, time, resource, functools, warnings
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from safetensors.torch import save_file, load_file, safe_open
warnings.filterwarnings('ignore', 'Sparse CSR tensor support is in beta')  # printed once by rows_grad's CSR product

# -----------------------------------------------------------------------------
# config: defaults, override with --key=value
data_dir = 'data/smollm2-l15'  # a capture.py folder ('synthetic' or a raw (N, d) .npy too, with --bench)
out_dir = 'out/smollm2-l15'
init_from = 'auto'       # 'auto' (resume if out_dir has ckpt.pt), 'scratch' (start over) or 'resume'
expansion = 16           # n_latents = expansion * d_model, unless n_latents is set
n_latents = 0            # 0: use expansion
k = 32                   # active latents per activation
batch_size = 4096        # activations per step, per process
max_iters = 1000         # 4.1M activations: 4 passes over the default 1M-token capture
learning_rate = 0.0      # 0: Adam at 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024, section 2.4)
lr_mult = 4.0            # times that rule, fitted to runs of billions of tokens: short runs learn faster with more (README)
warmup_iters = 50        # linear warmup steps
decay_frac = 0.2         # the last 20% of the steps decay the lr linearly to 0
grad_clip = 1.0
auxk_coef = 1 / 32       # Gao et al. 2024, appendix A.2
k_aux = 0                # 0: d_model // 2 (capped at the number of dead latents)
dead_tokens = 1_000_000  # dead = not fired for this many training tokens (Gao: 10M; one pass over the default capture)
val_frac = 0.05          # share of contexts held out for evaluation (whole contexts, never split)
eval_interval = 250
log_interval = 50
ckpt_interval = 100
fast = True              # the sparsity-aware step; False: plain dense autograd (same values and gradients, slower)
device = 'cpu'           # 'cpu' or 'cuda'
dtype = 'float32'        # 'float32' or 'bfloat16' (autocast: the encoder product in bf16, on CUDA or an AMX CPU)
seed = 1337
wandb_log = False
wandb_project = 'nanosae'
bench = False            # time max_iters steps on consecutive rows of data_dir, print activations/s and peak memory
d_model = 576            # width of the synthetic bench data
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------

def configure(g, keys, argv=None):
    """Override the config globals in `g` from --key=value arguments (nanoGPT's configurator, as a function).
    A mistake ends the run with one line naming what is valid; --help prints the docstring and every default."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        print(g['__doc__'].strip()); print('\n'.join(f'--{k}={g[k]!r}' for k in keys)); sys.exit(0)
    for arg in argv:
        key, eq, val = arg[2:].partition('=')
        if not arg.startswith('--') or not eq:
            raise SystemExit(f"bad argument '{arg}': use --key=value (see --help for the keys)")
        if key not in keys:
            raise SystemExit(f"unknown config key '{key}': valid keys are {', '.join(keys)}")
        kind = type(g[key])
        try:  # bool first: bool is a subclass of int; an int is accepted for a float key
            g[key] = {'true': True, 'false': False}[val.lower()] if kind is bool else kind(val)
        except (KeyError, ValueError):
            raise SystemExit(f"--{key}={val}: expected {'True or False' if kind is bool else kind.__name__} (default {g[key]!r})")
    return {k: g[k] for k in keys}

class TopKSAE(torch.nn.Module):
    """pre = (x - b_dec) @ W_enc + b_enc; keep the k largest, ReLU them; recon = vals @ W_dec[idx] + b_dec."""
    def __init__(self, d, n, k):
        super().__init__()
        self.k = k
        W = torch.randn(n, d)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W)                # (n, d): one unit-norm row per latent
        # the encoder [W_enc.T | b_enc] in one contiguous (n, d + 1) tensor: pre = [x - b_dec, 1] @ enc.T is one product
        # with no bias pass, the encoder's weight gradient is computed in this layout, and fused Adam runs on a
        # contiguous tensor (15 ms a step on a transposed view, 6 here). W_enc = W_dec.T at init.
        self.enc = torch.nn.Parameter(F.pad(W, (0, 1)))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))

    W_enc = property(lambda self: self.enc[:, :-1].T)  # (d, n), a view
    b_enc = property(lambda self: self.enc[:, -1])     # (n,), a view

    def encode(self, x):  # (B, d) -> vals, idx (B, k); the bias through the 1 of [x - b_dec, 1], as in training
        vals, idx = topk(F.pad(x - self.b_dec, (0, 1), value=1.0) @ self.enc.T, self.k)
        return vals.relu(), idx

    def decode(self, vals, idx, bias=True):  # the k rows of W_dec, weighted: never a dense (B, n) matrix
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode='sum')
        return out + self.b_dec if bias else out

    def forward(self, x):
        return self.decode(*self.encode(x))

def topk(pre, k, g=8):
    """pre.topk(k, dim=1, sorted=False): the same values (among equal values maybe other indices), in about 2/3 of
    the time of torch.topk on a CPU (31 vs 49 ms for k=32 of 9216). View each row as g slices of s = n / g and take
    their elementwise max: s column maxima in one vectorised pass. The k largest maxima are k distinct entries, so
    the k-th largest entry is at least the k-th largest maximum, and every entry of the top k lies in one of those
    k columns: the answer is the top k of their k * g entries. The k largest maxima are found the same way."""
    B, n = pre.shape
    if n % g or n < 4 * k * g: return pre.topk(k, dim=1, sorted=False)  # too narrow to pay off
    s = n // g
    _, col = topk(pre.view(B, g, s).amax(1), k, g)                                     # (B, k) columns
    cand = (col.unsqueeze(2) + torch.arange(0, n, s, device=pre.device)).view(B, k * g)  # their entries
    vals, j = pre.gather(1, cand).topk(k, dim=1, sorted=False)
    return vals, cand.gather(1, j)

def rows_grad(idx, g, x, out):
    """out[idx[b, i]] += g[b, i] * x[b] for all (b, i), in place: the encoder's weight gradient, (n, B) @ (B, d)
    with k non-zeros per column, as a CSR sparse product (columns sorted and distinct in each row)."""
    order = idx.flatten().argsort(stable=True)
    crow = F.pad(torch.bincount(idx.flatten(), minlength=len(out)).cumsum(0), (1, 0))
    A = torch.sparse_csr_tensor(crow, order // idx.shape[1], g.flatten()[order], (len(out), len(x)), check_invariants=False)
    return torch.addmm(out, A, x, out=out)  # out= itself: no copy of out (A @ x would zero-fill and copy, 8 ms)

_scratch = {}  # (B, n) pre-activation buffers, by shape

class SparseEncode(torch.autograd.Function):
    """The encoder and its top-k (plus the AuxK top-k_aux among dead latents), ReLU'd. Forward is one dense
    product; backward only touches the k + k_aux selected entries of each row, so the weight gradient is a
    sparse (n, B) @ (B, d) product instead of a dense (d, B) @ (B, n) one: about 1/300 of the work."""
    @staticmethod
    def forward(ctx, x, enc, b_dec, k, dead, k_aux):
        xc = F.pad(x - b_dec, (0, 1), value=1.0)                     # [x - b_dec, 1]: the 1 picks up b_enc
        # the one dense product (B, n), in bf16 under autocast (AMX on recent Xeons: 8x float32), written into a reused
        # buffer: on a CPU a fresh 150 MB tensor costs ~30 ms of page faults every step
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        key = (len(x), len(enc), x.device, dt)
        if key not in _scratch: _scratch[key] = torch.empty(key[:2], device=x.device, dtype=dt)
        pre = torch.mm(xc.to(dt), enc.T.to(dt), out=_scratch[key])
        vals, idx = topk(pre, k)
        vals = vals.float()                                         # (bf16 under autocast)
        if k_aux: avals, aidx = topk(pre.masked_fill_(~dead, -math.inf), k_aux); avals = avals.float()
        else: avals, aidx = pre.new_empty(len(x), 0), idx.new_empty(len(x), 0)
        ctx.save_for_backward(xc, enc, idx, vals, aidx, avals)
        ctx.mark_non_differentiable(idx, aidx)
        return vals.relu(), idx, avals.relu(), aidx

    @staticmethod
    def backward(ctx, g_vals, _, g_avals, __):
        xc, enc, idx, vals, aidx, avals = ctx.saved_tensors
        g, ga = g_vals * (vals > 0), g_avals * (avals > 0)         # d loss / d pre at the selected entries
        g_enc = rows_grad(idx, g, xc, torch.zeros_like(enc))       # (n, d + 1): W_enc.T's gradient and b_enc's
        if ga.numel():  # AuxK's entries: a latent can be in both sets of a row, so they are added in a second product
            rows_grad(aidx, ga, xc, g_enc)
        return None, g_enc, -(g_enc[:, -1] @ enc[:, :-1]), None, None, None  # d pre / d b_dec = -W_enc

def global_var(x):
    """sum ||x - mean(x)||^2 over the global batch (all DDP ranks), in float64: the FVU denominator."""
    f64 = torch.float64  # accumulated in float64, without a float64 copy of x (10 ms a step)
    s = torch.cat([x.sum(0, dtype=f64), x.pow(2).sum(dtype=f64).view(1), torch.tensor([len(x)], dtype=f64, device=x.device)])
    if dist.is_initialized(): dist.all_reduce(s)
    return (s[-2] - (s[:-2] ** 2).sum() / s[-1]).float()

def losses(sae, x, dead, k_aux, fast=True):
    """FVU and AuxK (Gao et al. 2024, section 2.4 and appendix A.2) of this rank's share of the global batch,
    both normalised by global variances, so that summing over ranks gives exactly the single-process loss."""
    k_aux = min(k_aux, int(dead.sum()))
    if fast:
        vals, idx, avals, aidx = SparseEncode.apply(x, sae.enc, sae.b_dec, sae.k, dead, k_aux)
        recon = sae.decode(vals, idx)
    else:  # the plain version: dense pre-activations, dense latents, dense decoder product
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        vals, idx = pre.topk(sae.k, dim=1, sorted=False)
        avals, aidx = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=1, sorted=False)
        vals, avals = vals.relu(), avals.relu()
        recon = torch.zeros_like(pre).scatter(1, idx, vals) @ sae.W_dec + sae.b_dec
    fvu = (x - recon).pow(2).sum() / global_var(x)
    aux = torch.zeros((), device=x.device)
    if k_aux:  # dead latents regress what the live ones missed: no b_dec, residual detached
        e = (x - recon).detach()
        e_hat = sae.decode(avals, aidx, bias=False) if fast else torch.zeros_like(pre).scatter(1, aidx, avals) @ sae.W_dec
        aux = (e - e_hat).pow(2).sum() / global_var(e)
    return fvu, aux, vals, idx

def update_dead(since_fired, vals, idx, n_tokens):
    """Count, in tokens, how long since each latent last fired (in any rank's share of the global batch)."""
    fired = torch.zeros_like(since_fired, dtype=torch.bool)
    fired[idx[vals > 0]] = True
    if dist.is_initialized(): dist.all_reduce(fired_i := fired.int()); fired = fired_i > 0
    since_fired += n_tokens
    since_fired[fired] = 0

def train_step(sae, opt, x, since_fired, lr, cfg):
    """One optimizer step on x (B, d), already scaled. Returns the global fvu, aux, l0."""
    dead = since_fired >= cfg['dead_tokens']
    with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg['dtype'] == 'bfloat16'):
        fvu, aux, vals, idx = losses(sae, x, dead, cfg['k_aux'] or len(x[0]) // 2, cfg['fast'])
    opt.zero_grad(set_to_none=True)
    (fvu + cfg['auxk_coef'] * aux).backward()
    stats = torch.stack([fvu.detach(), aux.detach(), (vals > 0).sum() / len(x)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:  # each rank's loss is its part of the global sum: summing gradients gives the global gradient
        for p in sae.parameters(): dist.all_reduce(p.grad)
        dist.all_reduce(stats)
    # remove from each decoder row's gradient its component along the row: the step then keeps rows near unit norm
    W, G = sae.W_dec.data, sae.W_dec.grad
    G.addcmul_(W, torch.linalg.vecdot(G, W).unsqueeze(1), value=-1)
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg['grad_clip'])
    for group in opt.param_groups: group['lr'] = lr
    opt.step()
    W /= W.norm(dim=1, keepdim=True)  # and exactly unit norm after the step
    update_dead(since_fired, vals, idx, len(x) * world)
    return stats[0].item(), stats[1].item(), stats[2].item() / world

def read_rows(path, idx):
    """Rows idx (sorted) of an (N, d) .npy as float32, read with pread, one call per run of consecutive rows. Not
    through a memory map: each row faulted in there maps its neighbours too (1.8 GB of RSS for 32k random rows of
    a 4.6 GB file), while this holds one batch, whatever the size of the file: a capture larger than RAM trains."""
    a = np.load(path, mmap_mode='r')
    out, row = np.empty((len(idx), a.shape[1]), a.dtype), a.shape[1] * a.itemsize
    starts = np.nonzero(np.diff(idx, prepend=-2) != 1)[0]
    with open(path, 'rb') as f:
        for s, e in zip(starts, np.append(starts[1:], len(idx))):
            assert os.preadv(f.fileno(), [out[s:e]], a.offset + int(idx[s]) * row) == (e - s) * row, f"short read of {path}"
    x = out.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        r = int(idx[np.nonzero(~np.isfinite(x).all(1))[0][0]])
        where = os.path.join(os.path.dirname(path), 'ctx.npy')
        where = f", context {np.load(where, mmap_mode='r')[r]}" if os.path.exists(where) else ''
        raise SystemExit(f"NaN or inf in {path} at row {r}{where}: recapture it with --dtype=float32")
    return torch.from_numpy(x)

@torch.no_grad()
def evaluate(sae, batches):
    """FVU around the global mean of all batches (streamed, float64), L0, and per latent: how often it fired
    and the sum of its activations."""
    s1, s2, sse, l0, n = 0, 0, 0, 0, 0
    count, act = (torch.zeros(sae.W_dec.shape[0], device=sae.W_dec.device) for _ in range(2))
    for x in batches:
        vals, idx = sae.encode(x)
        recon, x = sae.decode(vals, idx).double(), x.double()
        s1, s2, sse = s1 + x.sum(0), s2 + (x ** 2).sum(), sse + ((x - recon) ** 2).sum()
        l0, n = l0 + (vals > 0).sum().item(), n + len(x)
        count.index_add_(0, idx.flatten(), (vals > 0).float().flatten()); act.index_add_(0, idx.flatten(), vals.flatten())
    return {'fvu': (sse / (s2 - (s1 ** 2).sum() / n)).item(), 'l0': l0 / n, 'count': count, 'act': act}

def geometric_median(x, iters=100):
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() < 1e-6 * m.norm(): break
        m = m_new
    return m_new

def save_sae(sae, scale, path, info):
    """Write the SAE for raw activations: the input scale s is folded in (the training SAE saw s*x), so
    encode(x) = vals / s and decode gives recon / s; W_dec keeps unit rows. SAELens layout: cfg.json + weights."""
    t = {'W_enc': sae.W_enc, 'b_enc': sae.b_enc / scale, 'W_dec': sae.W_dec, 'b_dec': sae.b_dec / scale}
    t = {k: v.detach().float().cpu().contiguous() for k, v in t.items()}
    info = {**info, 'k': sae.k, 'scale': scale}
    meta = {'k': str(sae.k), 'scale': repr(scale), 'layer': str(info['layer']), 'model': info['model'], 'nanosae': json.dumps(info)}
    os.makedirs(path, exist_ok=True)
    save_file(t, os.path.join(path, 'sae_weights.tmp'), metadata=meta)
    cfg = {'architecture': 'topk', 'd_in': t['W_dec'].shape[1], 'd_sae': t['W_dec'].shape[0], 'k': sae.k, 'dtype': 'float32',
           'device': 'cpu', 'apply_b_dec_to_input': True, 'normalize_activations': 'none', 'rescale_acts_by_decoder_norm': False,
           'metadata': {'sae_lens_version': '6.0.0', 'model_name': info['model'], 'hook_name': info['hook'],
                        'context_size': info['ctx_len']}}
    with open(os.path.join(path, 'cfg.tmp'), 'w') as f: json.dump(cfg, f, indent=1)
    os.replace(os.path.join(path, 'cfg.tmp'), os.path.join(path, 'cfg.json'))
    os.replace(os.path.join(path, 'sae_weights.tmp'), os.path.join(path, 'sae_weights.safetensors'))

def load_sae(path, device='cpu'):
    """(sae, info) from a folder written by save_sae (or its .safetensors file); it takes raw activations."""
    f = path if path.endswith('.safetensors') else os.path.join(path, 'sae_weights.safetensors')
    if not os.path.isfile(f): raise SystemExit(f"no SAE at '{path}' (no {f}): train one with `python sae.py --out_dir={path}`")
    try:
        with safe_open(f, 'pt') as h: info = json.loads(h.metadata()['nanosae'])
        t = load_file(f, device=device)
    except Exception as e:
        raise SystemExit(f"'{f}' is not a nanoSAE file ({type(e).__name__}: {e}): pass a folder written by sae.py")
    sae = TopKSAE(t['W_dec'].shape[1], t['W_dec'].shape[0], info['k']).to(device)
    t['enc'] = torch.cat([t.pop('W_enc').T, t.pop('b_enc')[:, None]], 1)
    sae.load_state_dict(t)
    return sae.eval(), info

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    config = configure(globals(), config_keys)
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    if ddp: dist.init_process_group('nccl' if device == 'cuda' else 'gloo')
    if device == 'cuda': device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"; torch.cuda.set_device(device)
    torch.manual_seed(seed)
    log = print if rank == 0 else (lambda *a, **kw: None)
    # -------------------------------------------------------------------------
    # data: a global shuffle over all rows of the capture, with whole contexts held out for evaluation
    acts = os.path.join(data_dir, 'acts.npy')
    if bench:
        if data_dir == 'synthetic':
            acts = os.path.join(out_dir, 'synthetic.npy'); os.makedirs(out_dir, exist_ok=True)  # 8 batches, reused
            np.save(acts, np.random.default_rng(seed).standard_normal((8 * batch_size * world, d_model), dtype=np.float32))
        elif data_dir.endswith('.npy'): acts = data_dir
        meta = {'model': 'bench', 'layer': -1, 'hook': '', 'ctx_len': 0}
    elif not os.path.exists(os.path.join(data_dir, 'meta.json')):
        what = 'is an unfinished capture (no meta.json): rerun its capture.py command to finish it' if os.path.exists(acts) else \
               f'holds no capture: make one with `python capture.py --out_dir={data_dir}`'
        raise SystemExit(f"--data_dir={data_dir} {what}")
    else:
        with open(os.path.join(data_dir, 'meta.json')) as f: meta = json.load(f)
    N, d = np.load(acts, mmap_mode='r').shape
    n = n_latents or expansion * d
    if not 1 <= k <= n: raise SystemExit(f"--k={k}: valid is 1..{n} (n_latents)")
    if bench:
        held = 50_000 if N > 100_000 else 0  # the peers' held-out rows (shared/bench)
        rows, val_rows = np.arange(N - held), np.arange(N - held, N)
    else:
        ctx = np.load(os.path.join(data_dir, 'ctx.npy'))
        held = np.random.default_rng(seed).random(int(ctx.max()) + 1) < val_frac
        rows, val_rows = np.nonzero(~held[ctx])[0].astype(np.int32), np.nonzero(held[ctx])[0].astype(np.int32)  # 4 bytes a row
        del ctx
    gb = batch_size * world  # the global batch
    if gb > len(rows): raise SystemExit(f"--batch_size={batch_size} x {world} ranks is more than the {len(rows)} training rows: lower --batch_size")
    per_epoch = len(rows) // gb

    @functools.lru_cache(maxsize=1)
    def epoch_perm(e):  # a fresh permutation of all training rows each pass (consecutive rows in --bench, like the peers)
        return rows if bench else np.random.default_rng([seed, e]).permutation(rows)

    def batch_rows(it):  # this rank's rows of global step `it`, sorted so the gather walks the file forwards
        j = (it % per_epoch) * gb + rank * batch_size
        return np.sort(epoch_perm(it // per_epoch)[j:j + batch_size])

    # -------------------------------------------------------------------------
    # model and optimizer; resume from out_dir/ckpt.pt when it is there
    ident = {key: v for key, v in config.items() if key not in ('init_from', 'eval_interval', 'log_interval', 'ckpt_interval',
                                                                 'wandb_log', 'wandb_project', 'device', 'out_dir', 'fast', 'bench')}
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if dtype not in ('float32', 'bfloat16'): raise SystemExit(f"--dtype={dtype}: valid are float32, bfloat16")
    if init_from not in ('auto', 'scratch', 'resume'): raise SystemExit(f"--init_from={init_from}: valid are auto, scratch, resume")
    if init_from == 'resume' and not os.path.exists(ckpt_path): raise SystemExit(f"--init_from=resume: no checkpoint at {ckpt_path}")
    resume = init_from != 'scratch' and os.path.exists(ckpt_path) and not bench
    sae = TopKSAE(d, n, k).to(device)
    lr0 = (learning_rate or lr_mult * 2e-4 / math.sqrt(n / 2 ** 14))
    opt = torch.optim.Adam(sae.parameters(), lr=lr0, betas=(0.9, 0.999), eps=6.25e-10, weight_decay=0.0, fused=True)
    since_fired = torch.zeros(n, dtype=torch.long, device=device)
    it = 0
    if resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        diff = [f"{key}={ck['config'].get(key)!r} (now {v!r})" for key, v in ident.items() if ck['config'].get(key) != v]
        if diff: raise SystemExit(f"{ckpt_path} is from a different config ({', '.join(diff)}): pass --init_from=scratch or another --out_dir")
        try: sae.load_state_dict(ck['sae']); opt.load_state_dict(ck['opt']); since_fired.copy_(ck['since_fired'])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. written by an older sae.py (the encoder is now one tensor, enc)
            raise SystemExit(f"{ckpt_path} does not fit this sae.py ({' '.join(str(e).split())[:160]}): pass --init_from=scratch or another --out_dir")
        it, scale = ck['iter'], ck['scale']
        log(f"resuming from {ckpt_path} at step {it}")
    else:
        # input scale s so that E||s x||^2 = d, then b_dec at the geometric median of s x (Gao et al. 2024, section 2.1)
        sample = read_rows(acts, np.sort(np.random.default_rng(seed).choice(rows, min(len(rows), 32768), replace=False)))
        scale = math.sqrt(d / sample.pow(2).sum(1).mean().item())
        sae.b_dec.data.copy_(geometric_median(sample.to(device) * scale))
        del sample
    cfg = {'dead_tokens': dead_tokens, 'k_aux': k_aux, 'auxk_coef': auxk_coef, 'grad_clip': grad_clip, 'fast': fast, 'dtype': dtype}
    info = {**{key: meta.get(key) for key in ('model', 'layer', 'hook', 'ctx_len', 'd_model', 'N')}, 'k': k, 'n_latents': n,
            'scale': scale, 'data_dir': data_dir, 'capture': meta, 'config': config}
    if rank == 0 and wandb_log: import wandb; wandb.init(project=wandb_project, config=config)

    def lr_at(i):  # linear warmup, constant, then linear decay to 0
        return lr0 * min(1, (i + 1) / max(warmup_iters, 1)) * min(1, (max_iters - i) / max(decay_frac * max_iters, 1))

    def val_batches():
        for j in range(0, len(val_rows), batch_size): yield read_rows(acts, val_rows[j:j + batch_size]).to(device) * scale  # 8,192 let RSS grow with the set

    def run_eval():  # dead: never fired on the validation set, nor in the last dead_tokens tokens of training
        r = evaluate(sae, val_batches())
        count, act = r.pop('count'), r.pop('act')
        dead = ((count == 0) & (since_fired >= dead_tokens)).float().mean().item()
        return {**r, 'dead_frac': dead, 'tokens': it * gb}, (act / count.clamp_min(1) / scale).tolist()

    def write(obj, name):  # atomic: a temporary name, then os.replace
        torch.save(obj, os.path.join(out_dir, name + '.tmp')); os.replace(os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name))

    # -------------------------------------------------------------------------
    if rank == 0: os.makedirs(out_dir, exist_ok=True)
    if rank == 0 and not resume and os.path.exists(os.path.join(out_dir, 'metrics.jsonl')): os.remove(os.path.join(out_dir, 'metrics.jsonl'))
    log(f"{N} activations of {meta['hook'] or acts} (d={d}) -> {n} latents, k={k}, lr {lr0:.2e}, scale {scale:.4g}, "
        f"{len(rows)} train / {len(val_rows)} val rows, global batch {gb}, {max_iters} steps, {world} process(es)")
    if it >= max_iters and os.path.exists(os.path.join(out_dir, 'sae_weights.safetensors')):
        log(f"{out_dir} already holds this run, trained for {it} steps"); raise SystemExit(0)
    pool = ThreadPoolExecutor(1)  # gathers the next batch from the memmap while this one trains
    nxt = pool.submit(read_rows, acts, batch_rows(it))
    t0 = t_log = time.time(); t_wait = 0.0; times = []
    while it < max_iters:
        tw = time.time(); x = nxt.result().to(device) * scale; t_wait += time.time() - tw
        if it + 1 < max_iters: nxt = pool.submit(read_rows, acts, batch_rows(it + 1))
        fvu, aux, l0 = train_step(sae, opt, x, since_fired, lr_at(it), cfg)
        it += 1; times.append(time.perf_counter())
        if it % log_interval == 0 or it == max_iters:
            rate = log_interval * gb / (time.time() - t_log) if it % log_interval == 0 else 0; t_log = time.time()
            row = {'iter': it, 'tokens': it * gb, 'fvu': fvu, 'aux': aux, 'l0': l0, 'dead_pct': 100 * (since_fired >= dead_tokens).float().mean().item(),
                   'lr': lr_at(it - 1), 'acts_per_s': rate, 'data_wait_pct': 100 * t_wait / (time.time() - t0)}
            log(' | '.join(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()), flush=True)
            if rank == 0 and not bench:
                with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f: f.write(json.dumps(row) + '\n')
                if wandb_log: wandb.log(row)
        if rank == 0 and not bench and len(val_rows) and it % eval_interval == 0 and it < max_iters:
            ev = run_eval()[0]
            log(f"eval step {it}: fvu {ev['fvu']:.4f} | l0 {ev['l0']:.1f} | dead {100 * ev['dead_frac']:.2f}% | {ev['tokens']} tokens seen")
            with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f: f.write(json.dumps({'iter': it, 'eval': ev}) + '\n')
        if rank == 0 and not bench and (it % ckpt_interval == 0 or it == max_iters):
            write({'sae': sae.state_dict(), 'opt': opt.state_dict(), 'since_fired': since_fired, 'iter': it, 'scale': scale, 'config': ident}, 'ckpt.pt')
    if ddp:  # an invariant worth checking: every rank holds the same weights
        for p in sae.parameters():
            ref = p.detach().clone(); dist.broadcast(ref, 0)
            assert torch.equal(ref, p.detach()), "ranks disagree on the weights"
    if bench:
        dt, rss = np.median(np.diff(times[10:])), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training's peak, before eval
        # the floor: one x @ W_enc as written (a fresh output), and into a reused buffer like our step's (no page faults)
        xb, W = read_rows(acts, batch_rows(0)).to(device) * scale, sae.W_enc.detach().contiguous()
        xb, W = (xb, W) if dtype == 'float32' else (xb.bfloat16(), W.bfloat16())
        buf = torch.empty(len(xb), n, device=device, dtype=xb.dtype)
        def timed(f):  # steps and products both by their median: this machine is noisy
            ts = []
            for _ in range(20): t = time.perf_counter(); f(); 'cuda' in device and torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
            return float(np.median(ts))
        t_mm, t_into = timed(lambda: xb @ W), timed(lambda: torch.mm(xb, W, out=buf))
        ev = run_eval()[0] if len(val_rows) else {'fvu': float('nan'), 'dead_frac': float('nan')}
        print(json.dumps({'nanosae': 'fast' if fast else 'dense', 'acts_per_s': round(batch_size / dt, 1), 's_per_step': round(dt, 4),
                          'matmul_s': round(t_mm, 4), 'step_over_matmul': round(dt / t_mm, 3),
                          'matmul_into_s': round(t_into, 4), 'step_over_matmul_into': round(dt / t_into, 3), 'data_wait_pct': round(100 * t_wait / (time.time() - t0), 2),
                          'peak_rss_mb': round(rss, 1), 'fvu': ev['fvu'], 'dead_frac': ev['dead_frac'],
                          'd': d, 'n_latents': n, 'k': k, 'batch': batch_size, 'dtype': dtype, 'steps': max_iters, 'threads': torch.get_num_threads()}))
    elif rank == 0:
        ev, act_mean = run_eval() if len(val_rows) else ({}, [])
        with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f: f.write(json.dumps({'iter': it, 'eval': ev}) + '\n')
        # act_mean: each latent's mean activation when it fires (raw units), steer.py's unit of strength
        info.update(iters=it, tokens=it * gb, eval=ev, train_seconds=round(time.time() - t0, 1), act_mean=[float(f'{a:.4g}') for a in act_mean])
        save_sae(sae, scale, out_dir, info)
        log(f"saved {out_dir}/sae_weights.safetensors: fvu {ev.get('fvu', float('nan')):.4f}, l0 {ev.get('l0', 0):.1f}, "
            f"dead {100 * ev.get('dead_frac', 0):.2f}%, {it * gb / (time.time() - t0):.0f} activations/s over {time.time() - t0:.0f}s")
    if ddp: dist.barrier(); dist.destroy_process_group()  # ranks leave together: none tears down while rank 0 still writes
