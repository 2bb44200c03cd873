"""
Train a sparse autoencoder on the activations that capture.py wrote: BatchTopK (Bussmann et al.
2024, the default), TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") or
Matryoshka BatchTopK (Bussmann et al. 2025); save it as safetensors (SAELens layout) for steer.py.
Read it top to bottom: the SAE as its math, the archs, the loss and the step, then (on a second
read) the fast path that computes the same loss faster, the files, the checks; main last.
$ python sae.py                                    # data/smollm2-l15 -> out/smollm2-l15
$ python sae.py --arch=topk --out_dir=out/smollm2-l15-topk      # or --arch=matryoshka
$ python sae.py --fast=False --out_dir=out/plain   # the plain path: the same training, slower
$ python sae.py --data_dir=data/l1b-l8 --out_dir=out/l1b-l8 --expansion=32 --k=64 --device=cuda
$ torchrun --standalone --nproc_per_node=4 sae.py --device=cuda    # DDP; batch_size is per process
Kill it at any point and rerun the same command: it resumes from out_dir/ckpt.pt.
"""
import gc, os, io, sys, json, math, time, fcntl, shlex, functools, warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from safetensors.torch import save, load_file, safe_open
# printed once by rows_grad's CSR product; the CSR product itself has been stable for years
warnings.filterwarnings('ignore', 'Sparse CSR tensor support is in beta')

# -----------------------------------------------------------------------------
# config: defaults, override with --key=value
data_dir = 'data/smollm2-l15'  # a folder written by capture.py
out_dir = 'out/smollm2-l15'
init_from = 'auto'       # 'auto' (resume if out_dir has ckpt.pt), 'scratch' or 'resume'
expansion = 16           # n_latents = expansion * d_model, unless n_latents is set
n_latents = 0            # 0: use expansion
k = 32                   # active latents per activation (batchtopk, matryoshka: on average)
arch = 'batchtopk'       # a key of ARCHS: 'topk', 'batchtopk' or 'matryoshka' (README: which)
prefixes = ''            # matryoshka: where the nested prefixes end, e.g. '288,576,1152,2304,9216';
                         # '': at n/32, n/16, n/8, n/4 and n (Bussmann et al. 2025)
theta_rate = 0.05        # batchtopk, matryoshka: the weight of each step in theta's running mean
fast = True              # the fast path (the same loss, computed faster); False: the plain path
batch_size = 4096        # activations per step, per process
max_iters = 1000         # 4.1M activations: 8 passes over the default 500k-token capture
learning_rate = 0.0      # 0: Adam at 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024, section 2.4)
lr_mult = 4.0            # times that rule: it is fitted to billions of tokens (README)
warmup_iters = 50        # linear warmup steps
decay_frac = 0.2         # the last 20% of the steps decay the lr linearly to 0
grad_clip = 1.0
auxk_coef = 1 / 32       # Gao et al. 2024, appendix A.2
k_aux = 0                # 0: d_model // 2 (capped at the number of dead latents)
dead_tokens = 1_000_000  # dead = not fired for this many tokens (Gao: 10M; here two passes)
val_frac = 0.05          # share of contexts kept for validation (whole contexts): FVU, dead
sink_norm = 10.0         # rows above this many times the median norm are left out (0: none)
eval_interval = 250
log_interval = 50
ckpt_interval = 100
device = 'cpu'           # 'cpu', 'cuda' or 'cuda:N'
dtype = 'auto'           # encoder product: 'auto' (bfloat16 where native), 'float32', 'bfloat16'
seed = 1337
wandb_log = False
wandb_project = 'nanosae'
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# the valid values of each key, checked before any work starts: a tuple lists them, a string is
# a condition on the value v (k is checked against n_latents once the data's width is known; arch
# against ARCHS, below)
rules = {'init_from': ('auto', 'scratch', 'resume'), 'expansion': 'v >= 1', 'n_latents': 'v >= 0',
         'batch_size': 'v >= 1', 'max_iters': 'v >= 1', 'learning_rate': '0 <= v < 1',
         'lr_mult': 'v > 0', 'warmup_iters': 'v >= 0', 'decay_frac': '0 <= v <= 1',
         'grad_clip': 'v > 0', 'auxk_coef': 'v >= 0', 'k_aux': 'v >= 0', 'dead_tokens': 'v >= 0',
         'val_frac': '0 <= v < 1', 'eval_interval': 'v >= 1', 'log_interval': 'v >= 1',
         'ckpt_interval': 'v >= 1', 'dtype': ('auto', 'float32', 'bfloat16'), 'seed': 'v >= 0',
         'theta_rate': '0 < v <= 1', 'sink_norm': 'v >= 0'}

# -----------------------------------------------------------------------------
# the SAE, as its math (Gao et al. 2024, section 2)
class SAE(torch.nn.Module):
    """pre = (x - b_dec) @ W_enc + b_enc        W_enc (d, n), b_enc (n,): the pre-activations
    z = relu of the arch's active latents      (B, n), mostly zeros: the codes (ARCHS, below)
    recon = z @ W_dec + b_dec                  W_dec (n, d): one unit-norm row per latent"""

    def __init__(self, d, n, k, arch='topk', ends=()):
        super().__init__()
        # ends: the nested prefixes of the latent list that each reconstruct x in the loss (latents
        # 0..end - 1 for each end), for an arch with prefixes; one, all n latents, for the others
        self.k, self.arch = k, arch
        self.ends = list(ends) if ARCHS[arch].get('prefixes') and ends else [n]
        # Gao et al. 2024, section 2.1: random unit rows; the encoder starts as their transpose
        W = torch.randn(n, d)
        W /= W.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(W.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.W_dec = torch.nn.Parameter(W)
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        # batchtopk, matryoshka: the threshold that stands in for the batch at inference
        self.register_buffer('theta', torch.zeros(()))
        # rows with a larger norm are attention sinks past position 0, which training left out:
        # they get no codes, and forward passes them through unchanged
        self.register_buffer('max_norm', torch.tensor(math.inf))

    # (x - b_dec) @ W_enc + b_enc, as one product (under autocast, all of it in bf16)
    def pre(self, x):
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    # the codes at inference (evaluation, steering): the arch's encode, with no batch to see
    def encode(self, x):
        z = ARCHS[self.arch]['encode'](self.pre(x), self)
        z[x.norm(dim=1) > self.max_norm] = 0
        return z

    def decode(self, z):
        return z @ self.W_dec + self.b_dec

    def forward(self, x):
        sink = x.norm(dim=1, keepdim=True) > self.max_norm
        return torch.where(sink, x, self.decode(self.encode(x)))

# -----------------------------------------------------------------------------
# the archs: each one's choice of active latents in training (select) and at inference (encode),
# each a function of the pre-activations (B, n) and the SAE; and where it has them, nested prefixes
# in the loss (prefixes), a loss term of its own (loss, of the SAE, x and the codes) and an update
# after each step (update). A new arch is one more entry in ARCHS (README, "Fork it"): nothing
# else names an arch.

# the k largest of each row of x, relu'd, as dense codes
def top_k(x, k):
    vals, idx = x.topk(k, dim=1)
    return torch.zeros_like(x).scatter(1, idx, vals.relu())

# batchtopk: the k*B largest entries of relu(pre) over the whole batch, so k per row on average: a
# busy token gets more latents, a plain one fewer (Bussmann et al. 2024). Ties go to the lower
# row-major index, as a stable sort takes them.
def batch_top_k(pre, sae):
    v = pre.relu().flatten()
    keep = v.argsort(descending=True, stable=True)[:sae.k * len(pre)]
    return torch.zeros_like(v).index_put((keep,), v[keep]).view_as(pre)

# at inference a batchtopk SAE has no batch: a JumpReLU keeps relu(pre) where pre > theta (>= 0),
# 0 elsewhere: torch's threshold
def jump_relu(pre, sae):
    return F.threshold(pre, sae.theta.item(), 0.0)

# theta: a running mean of the smallest value each step keeps (dictionary_learning's estimator;
# under DDP the mean over ranks), weight theta_rate per step, starting at the first step's value
def update_theta(sae, z, cfg):
    low = z.detach().masked_fill(z <= 0, math.inf).min()
    if dist.is_initialized():
        dist.all_reduce(low)
        low /= dist.get_world_size()
    sae.theta += (cfg['theta_rate'] if sae.theta > 0 else 1) * (low - sae.theta)

ARCHS = {
    # Gao et al. 2024: exactly k per row, in training and at inference
    'topk': dict(select=lambda pre, sae: top_k(pre, sae.k),
                 encode=lambda pre, sae: top_k(pre, sae.k), saelens='topk'),
    'batchtopk': dict(select=batch_top_k, encode=jump_relu, update=update_theta),
    # Bussmann et al. 2025: batchtopk, and every prefix of the latent list (sae.ends) reconstructs
    # x alone too, so the first latents must stand alone: general features first, specific later
    'matryoshka': dict(select=batch_top_k, encode=jump_relu, update=update_theta, prefixes=True),
}
rules['arch'] = tuple(ARCHS)

# -----------------------------------------------------------------------------
# training: the loss, one step, the start, the validation

# The loss of a batch x (B, d) (Gao et al. 2024, section 2.4 and appendix A.2): the FVU of the
# reconstruction (the sum of each prefix's, for an arch with prefixes), the arch's own term, and
# AuxK for the dead latents. Under DDP, x is this rank's
# share of the global batch and var the global variance (global_var): summed over ranks, each is
# the one-process value. Returns the loss, aux, fvu, the codes (B, n) and which latents fired.
def losses(sae, x, dead, k_aux, var):
    pre = sae.pre(x)
    arch = ARCHS[sae.arch]
    z = arch['select'](pre, sae)
    # FVU, not MSE: the loss has no unit, so one learning rate fits every layer and model. Each
    # prefix's FVU, from the one selection (a prefix never selects again: Bussmann et al. 2025,
    # section 3; SAELens first did), with equal weights as in the paper; the whole one's last
    cols = torch.arange(z.shape[1], device=x.device)
    recon = [sae.decode(z * (cols < end)) for end in sae.ends]
    fvu = [((x - r) ** 2).sum() / var for r in recon]
    loss = sum(fvu) + arch['loss'](sae, x, z) if 'loss' in arch else sum(fvu)
    # AuxK: the k_aux largest pre-activations among dead latents regress what the live ones
    # missed: no b_dec (the residual has none; with it, AuxK would fit b_dec), residual detached
    aux = torch.zeros((), device=x.device)
    if k_aux:
        e = (x - recon[-1]).detach()
        aux = ((e - top_k(pre.masked_fill(~dead, -math.inf), k_aux) @ sae.W_dec) ** 2).sum()
        aux = aux / global_var(e)
    return loss, aux, fvu[-1], z, (z > 0).any(0)

# sum ||x - mean(x)||^2 over the global batch (all DDP ranks), in float64: FVU's denominator.
def global_var(x):
    # accumulated in float64 without a float64 copy of x
    f64 = torch.float64
    s = torch.cat([x.sum(0, dtype=f64), x.pow(2).sum(dtype=f64).view(1),
                   x.new_ones(1, dtype=f64) * len(x)])
    if dist.is_initialized():
        dist.all_reduce(s)
    return (s[-2] - (s[:-2] ** 2).sum() / s[-1]).float()

# One optimizer step on x (B, d), already scaled, with the config's fast, dead_tokens, k_aux,
# auxk_coef, grad_clip, theta_rate and dtype. Returns the global fvu, aux, l0.
def train_step(sae, opt, x, since_fired, lr, cfg):
    # the dead set is fixed for the whole step, before the forward; AuxK can use at most as many
    # latents as are dead
    dead = since_fired >= cfg['dead_tokens']
    k_aux = min(cfg['k_aux'] or x.shape[1] // 2, int(dead.sum()))
    # the fast path for an arch that has one (FAST), the plain one otherwise
    loss_fn = fast_losses if cfg['fast'] and sae.arch in FAST else losses
    with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg['dtype'] == 'bfloat16'):
        loss, aux, fvu, z, fired = loss_fn(sae, x, dead, k_aux, global_var(x))
    opt.zero_grad(set_to_none=True)
    (loss + cfg['auxk_coef'] * aux).backward()
    stats = torch.stack([fvu.detach(), aux.detach(), (z > 0).sum() / len(x)])
    fired = fired.int()
    # each rank's loss is its part of the global sum: summing gradients gives the global gradient
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        for t in [p.grad for p in sae.parameters()] + [stats, fired]:
            # NCCL takes contiguous tensors (W_enc's gradient is latent-major: its transpose is)
            dist.all_reduce(t if t.is_contiguous() else t.T)
    # remove from each decoder row's gradient its component along the row: the step then moves
    # the row along the unit sphere (to first order) instead of changing its norm
    W, G = sae.W_dec.data, sae.W_dec.grad
    G.addcmul_(W, torch.linalg.vecdot(G, W).unsqueeze(1), value=-1)
    # clipping at 1.0, as dictionary_learning and SAELens do
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg['grad_clip'])
    for group in opt.param_groups:
        group['lr'] = lr
    opt.step()
    # and exactly unit norm after the step: Adam's step leaves the sphere, and the saved rows must
    # be unit norm for latent values to be comparable
    W /= W.norm(dim=1, keepdim=True)
    update_dead(since_fired, fired, len(x) * world)
    if 'update' in ARCHS[sae.arch]:
        ARCHS[sae.arch]['update'](sae, z, cfg)
    return stats[0].item(), stats[1].item(), stats[2].item() / world

# Count, in tokens, how long since each latent last fired (fired: > 0 where any rank's share of the
# batch fired it): in tokens, not steps, so the dead set does not depend on the batch size (OAI
# counts steps).
def update_dead(since_fired, fired, n_tokens):
    since_fired += n_tokens
    since_fired[fired > 0] = 0

# Adam with no weight decay: AdamW's default 0.01 would shrink every weight at every step (one
# llama3 replication trains with it). eps as in Gao et al.'s code.
def make_optimizer(sae, lr):
    return torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10, weight_decay=0.0, fused=True)

# Gao et al. 2024, section 2.1: one input scale s so that E||s x||^2 = d, then b_dec at the
# geometric median of s x, in the space the SAE trains in (not the mean: a few far outliers, like
# attention sinks, would drag it). Returns s.
def init_from_data(sae, x):
    scale = math.sqrt(x.shape[1] / x.pow(2).sum(1).mean().item())
    sae.b_dec.data.copy_(geometric_median(x.to(sae.b_dec.device) * scale))
    return scale

# Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x.
def geometric_median(x, iters=100):
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        # stop once a step moves less than a millionth of the median's norm
        if (m_new - m).norm() < 1e-6 * m.norm():
            break
        m = m_new
    return m_new

# FVU around the global mean of all batches (streamed, float64; a per-batch mean would inflate it),
# L0, and per latent: how often it fired.
@torch.no_grad()
def evaluate(sae, batches):
    s1, s2, sse, l0, n, count = 0, 0, 0, 0, 0, 0
    for x in batches:
        z = sae.encode(x)
        recon, x = sae.decode(z).double(), x.double()
        s1, s2, sse = s1 + x.sum(0), s2 + (x ** 2).sum(), sse + ((x - recon) ** 2).sum()
        l0, n = l0 + (z > 0).sum().item(), n + len(x)
        count = count + (z > 0).sum(0)
    # sum ||x - mean||^2 = sum ||x||^2 - ||sum x||^2 / n
    return {'fvu': (sse / (s2 - (s1 ** 2).sum() / n)).item(), 'l0': l0 / n, 'count': count}

# -----------------------------------------------------------------------------
# fast path, same math (skip on a first read): the loss above without a dense (B, n) step
# but the encoder's one product. Codes are flat here: values, latents and rows (rows in order).
# The selections find the same latents without sorting the batch; the backward touches only the
# selected entries (a sparse product, about 1/300 of the dense one's work); the decoder sums
# rows of W_dec (a bag) instead of multiplying a mostly-zero (B, n) matrix. The tests hold each
# arch here to its plain version: loss, gradients, weights after steps, selections.

# The loss as `losses` computes it: the same values and gradients, and the codes' values and
# which latents fired.
def fast_losses(sae, x, dead, k_aux, var):
    codes = SparseEncode.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, FAST[sae.arch], sae.k, dead,
                               k_aux)
    # the selection's codes first, then AuxK's (k_aux a row)
    m = len(codes[0]) - len(x) * k_aux
    (vals, lat, rows), dead_codes = [t[:m] for t in codes], [t[m:] for t in codes]
    recon = [bag(sae.W_dec, vals * (lat < end), lat, rows, len(x)) + sae.b_dec for end in sae.ends]
    fvu = [((x - r) ** 2).sum() / var for r in recon]
    aux = torch.zeros((), device=x.device)
    if k_aux:
        e = (x - recon[-1]).detach()
        aux = ((e - bag(sae.W_dec, *dead_codes, len(x))) ** 2).sum() / global_var(e)
    fired = torch.bincount(lat[vals > 0], minlength=len(sae.W_dec)) > 0
    return sum(fvu), aux, fvu[-1], vals, fired

# sum over codes of vals * W[lat], row by row (rows in order): (B, d), never a (B, n) matrix, and
# no work for a code whose value is 0
def bag(W, vals, lat, rows, B):
    keep = vals != 0
    offsets = F.pad(torch.bincount(rows[keep], minlength=B).cumsum(0)[:-1], (1, 0))
    return F.embedding_bag(lat[keep], W, offsets, per_sample_weights=vals[keep], mode='sum')

# pre.topk(k, dim=1, sorted=False) (among equal values maybe other indices), faster on a CPU. View
# each row as g slices of s = n / g and take their elementwise max: s column maxima in one pass.
# The k largest maxima are k distinct entries, so every entry of the top k lies in one of those k
# columns: the answer is the top k of their k * g entries. The k largest maxima, recursively.
def topk(pre, k, g=8):
    B, n = pre.shape
    # too narrow to pay off
    if n % g or n < 4 * k * g:
        return pre.topk(k, dim=1, sorted=False)
    s = n // g
    _, col = topk(pre.view(B, g, s).amax(1), k, g)  # (B, k) columns
    # the g entries of each chosen column: k * g candidates per row
    cand = (col.unsqueeze(2) + torch.arange(0, n, s, device=pre.device)).view(B, k * g)
    vals, j = pre.gather(1, cand).topk(k, dim=1, sorted=False)
    return vals, cand.gather(1, j)

# top_k as flat codes: values (relu'd), latents and rows
def fast_top_k(pre, k):
    vals, lat = topk(pre, k)
    rows = torch.arange(len(pre), device=pre.device).repeat_interleave(k)
    return vals.relu().flatten(), lat.flatten(), rows

# The entries of x (B, n) that can be among its K largest, as (values, row-major positions), in
# order: topk's argument over the whole batch. The K largest column maxima (recursively) are K
# distinct entries, so the K-th largest entry is at least t, the K-th largest maximum: only the
# entries >= t of the columns whose maximum is >= t are candidates (all ties included).
def candidates(x, K, g=8):
    B, n = x.shape
    s = n // g
    if n % g or B * s < 2 * K:
        return x.flatten(), torch.arange(x.numel(), device=x.device)
    v, p = candidates(x.view(B, g, s).amax(1), K, g)
    t = v.kthvalue(len(v) - K + 1).values
    p = p[v >= t]
    # the g entries of each such column, by their place in x
    p = ((p // s * n + p % s)[:, None] + torch.arange(0, n, s, device=x.device)).flatten()
    v = x.flatten()[p]
    keep = v >= t
    return v[keep], p[keep]

# batch_top_k as flat codes: the k*B largest entries of relu(pre), ties to the lower row-major
# index, as a flatten-and-stable-sort would take them; never a sort of all B*n
def fast_batch_top_k(pre, k):
    B, n = pre.shape
    K = min(k * B, pre.numel())
    v, p = candidates(pre, K)
    # the K-th largest entry; with fewer than K positive ones, every positive one
    t = v.kthvalue(len(v) - K + 1).values.clamp_min(0)
    keep = v > t
    # ties at t: the lowest row-major positions, until K are kept
    if t > 0:
        tie = torch.nonzero(v == t).flatten()
        keep[tie[p[tie].argsort()[:K - int(keep.sum())]]] = True
    # in row-major order: rows in order
    p, order = p[keep].sort()
    return v[keep][order], p % n, p // n

# the fast selection of each arch that has one, and no loss term of its own (the rest train on the
# plain path)
FAST = {'topk': fast_top_k, 'batchtopk': fast_batch_top_k, 'matryoshka': fast_batch_top_k}

# out[lat] += g * x[rows] for every code, in place: the encoder's weight gradient, (n, B) @ (B, d)
# with k non-zeros per column, as a CSR sparse product.
def rows_grad(lat, rows, g, x, out):
    # a code with no gradient (a slot that keeps nothing) needs no work
    p = torch.nonzero(g).flatten()
    lat = lat[p]
    # CSR wants each row's columns sorted: a stable sort of the latent ids groups them by latent
    order = lat.argsort(stable=True)
    crow = F.pad(torch.bincount(lat, minlength=len(out)).cumsum(0), (1, 0))
    A = torch.sparse_csr_tensor(crow, rows[p][order], g[p][order], (len(out), len(x)),
                                check_invariants=False)
    # into out itself: A @ x would zero-fill a fresh output and copy it
    return torch.addmm(out, A, x, out=out)

_scratch = {}

# A buffer reused at every step, by shape, device and dtype: on a CPU a fresh big tensor is paid in
# page faults each time
def scratch(*key):
    if key not in _scratch:
        _scratch[key] = torch.empty(key[0], device=key[1], dtype=key[2])
    return _scratch[key]

# The encoder and the SAE's selection, relu'd, as flat codes, then AuxK's top k_aux among dead
# latents. Forward is one dense product; backward touches only the codes' entries.
class SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, select, k, dead, k_aux):
        # pre = [x - b_dec, 1] @ [W_enc; b_enc]: one product, no pass to add the bias; bf16 under
        # autocast. W_enc is latent-major in memory (SAE's W.T.clone()), so [W_enc; b_enc] is
        # built transposed, (n, d + 1), from contiguous copies
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        (d, n), xc = W_enc.shape, x - b_dec
        w, pre = scratch((n, d + 1), x.device, dt), scratch((len(x), n), x.device, dt)
        w[:, :d].copy_(W_enc.T)
        w[:, d].copy_(b_enc)
        torch.mm(F.pad(xc, (0, 1), value=1.0).to(dt), w.T, out=pre)
        codes = select(pre, k)
        # AuxK's, found in the same buffer (live latents masked)
        if k_aux:
            codes = [torch.cat(t) for t in zip(codes, fast_top_k(pre.masked_fill_(~dead, -math.inf),
                                                                 k_aux))]
        vals, lat, rows = codes
        vals = vals.float()
        ctx.save_for_backward(xc, W_enc, vals, lat, rows)
        ctx.mark_non_differentiable(lat, rows)
        return vals, lat, rows

    @staticmethod
    def backward(ctx, g, _, __):
        xc, W_enc, vals, lat, rows = ctx.saved_tensors
        # ReLU (and a code that keeps nothing) passes the gradient only where the value is
        # positive; a latent in both sets of a row has both codes, whose gradients add
        g = g * (vals > 0)
        # W_enc's gradient latent-major, (n, d): its transpose has W_enc's layout, so no copy
        g_W = rows_grad(lat, rows, g, xc, xc.new_zeros(W_enc.T.shape)).T
        g_b = xc.new_zeros(W_enc.shape[1]).index_add_(0, lat, g)
        # d pre / d b_dec = -W_enc
        return None, g_W, g_b, -(W_enc @ g_b), None, None, None, None

# -----------------------------------------------------------------------------
# files: the capture's rows, the SAE, the checkpoint (skip on a first read)

# Rows idx (sorted) of a capture's acts.npy as float32, read with pread, one call per run of
# consecutive rows. Not through a memory map: each row faulted in there maps its neighbours too,
# while this holds one batch, whatever the size of the file: a capture larger than RAM trains.
def read_rows(path, idx):
    a = np.load(path, mmap_mode='r')
    out, row = np.empty((len(idx), a.shape[1]), a.dtype), a.shape[1] * a.itemsize
    starts = np.nonzero(np.diff(idx, prepend=-2) != 1)[0]
    with open(path, 'rb') as f:
        for s, e in zip(starts, np.append(starts[1:], len(idx))):
            got = os.preadv(f.fileno(), [out[s:e]], a.offset + int(idx[s]) * row)
            assert got == (e - s) * row, f"short read of {path}"
    x = out.astype(np.float32, copy=False)
    check_finite(x, idx, os.path.dirname(path), f"{path} is damaged: recapture it with "
                 f"--dtype=float32")
    return torch.from_numpy(x)

# Write the SAE for raw activations: the input scale s is folded in (the training SAE saw s*x), so
# encode(x) = vals / s and decode gives recon / s; W_dec keeps unit rows. SAELens's layout: cfg.json
# + sae_weights.safetensors, which SAE.load_from_disk(path) reads: topk as 'topk', the others as
# 'jumprelu' with theta as every latent's threshold (SAELens saves BatchTopK so; theta 0 is a relu).
def save_sae(sae, scale, path, info):
    # pre(s x) = s ((x - b_dec / s) W_enc + b_enc / s): dividing both biases by s gives pre / s,
    # and theta, a value of pre, is divided too
    info = {**info, 'k': sae.k, 'scale': scale, 'arch': sae.arch, 'ends': sae.ends,
            'theta': (sae.theta / scale).item(), 'max_norm': (sae.max_norm / scale).item()}
    t = {'W_enc': sae.W_enc, 'b_enc': sae.b_enc / scale, 'W_dec': sae.W_dec,
         'b_dec': sae.b_dec / scale}
    layout = ARCHS[sae.arch].get('saelens', 'jumprelu')
    if layout == 'jumprelu':
        t['threshold'] = torch.full((len(sae.W_dec),), info['theta'])
    t = {k: v.detach().float().cpu().contiguous() for k, v in t.items()}
    # safetensors metadata is str -> str: the numbers a reader looks for first, then all as JSON
    meta = {**{key: str(info[key]) for key in ('k', 'scale', 'layer', 'model', 'arch', 'theta')},
            'nanosae': json.dumps(info)}
    cfg = {'architecture': layout, 'd_in': t['W_dec'].shape[1],
           'd_sae': t['W_dec'].shape[0], 'dtype': 'float32', 'device': 'cpu',
           'apply_b_dec_to_input': True, 'normalize_activations': 'none',
           'metadata': {'sae_lens_version': '6.0.0', 'model_name': info['model'],
                        'hook_name': info['hook'], 'context_size': info['ctx_len']}}
    # only topk has a k; only its layout has the decoder-norm option
    if layout == 'topk':
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # the weights last: their file is what load_sae looks for
    write_file(path / 'cfg.json', cfg)
    write_file(path / 'sae_weights.safetensors', save(t, metadata=meta))

# (sae, info) from a folder written by save_sae (or its .safetensors file), checked against its own
# metadata; the SAE takes raw activations. A file of an older nanoSAE is one line: retrain.
def load_sae(path, device='cpu'):
    f = path if path.endswith('.safetensors') else os.path.join(path, 'sae_weights.safetensors')
    if not os.path.isfile(f):
        raise SystemExit(f"no SAE at '{path}' (no {f}): train one with "
                         f"`python sae.py --out_dir={path}`")
    # a file cut short, not safetensors at all, tensors that do not fit its metadata, or metadata
    # of an older version (a key missing, an arch this sae.py does not have): one line
    try:
        with safe_open(f, 'pt') as h:
            info = json.loads(h.metadata()['nanosae'])
        t = load_file(f)
        if not 1 <= info['k'] <= info['n_latents'] or info['arch'] not in ARCHS:
            raise ValueError(f"k={info['k']} of {info['n_latents']} latents, arch {info['arch']}")
        sae = SAE(t['W_dec'].shape[1], info['n_latents'], info['k'], info['arch'], info['ends'])
        # theta: every latent's threshold (a topk SAE has none: 0); load_state_dict checks shapes
        t['theta'] = t.pop('threshold', torch.zeros(1))[0]
        t['max_norm'] = torch.tensor(float(info['max_norm']))
        sae.load_state_dict(t)
    except Exception as e:
        raise SystemExit(f"'{f}' is not a whole nanoSAE file of this version ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}): retrain it with "
                         f"`python sae.py --init_from=scratch --out_dir={os.path.dirname(f)}`")
    return sae.to(device).eval(), info

# Everything a resumed run needs to continue exactly, in ckpt.pt (written whole or not at all).
def save_checkpoint(path, sae, opt, since_fired, it, scale, ident):
    buf = io.BytesIO()
    torch.save({'sae': sae.state_dict(), 'opt': opt.state_dict(), 'since_fired': since_fired,
                'iter': it, 'scale': scale, 'config': ident}, buf)
    write_file(path, buf.getbuffer())

# Restore a run from ckpt.pt; returns (iter, scale). A checkpoint of another config, of an older
# sae.py, or cut short (a disk that filled, a copy interrupted) gives one line.
def load_checkpoint(path, sae, opt, since_fired, ident, device):
    ways_out = "pass --init_from=scratch (start over) or another --out_dir"
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise SystemExit(f"{path} is damaged ({type(e).__name__}): {ways_out}")
    diff = config_diff(ck['config'], ident)
    if diff:
        raise SystemExit(f"{path} is from a different config ({diff}): {ways_out}")
    try:
        sae.load_state_dict(ck['sae'])
        opt.load_state_dict(ck['opt'])
        since_fired.copy_(ck['since_fired'])
    except (RuntimeError, ValueError, KeyError) as e:
        msg = ' '.join(str(e).split())[:160]
        raise SystemExit(f"{path} does not fit this sae.py ({msg}): {ways_out}")
    return ck['iter'], ck['scale']

# -----------------------------------------------------------------------------
# the checks and safe writes that capture.py and steer.py import too (skip on a first read)

# Override the config globals in `g` from --key=value arguments (nanoGPT's configurator, as a
# function), then check every value against its rule. A mistake ends the run with one line that
# names what is valid; --help prints the docstring and every default.
def configure(g, keys, rules, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print(g['__doc__'].strip())
        print('\n'.join(f'--{k}={g[k]!r}' for k in keys))
        sys.exit(0)
    for arg in argv:
        key, eq, val = arg[2:].partition('=')
        if not arg.startswith('--') or not eq:
            raise SystemExit(f"bad argument '{arg}': use --key=value (see --help for the keys)")
        if key not in keys:
            raise SystemExit(f"unknown config key '{key}': valid keys are {', '.join(keys)}")
        kind = type(g[key])
        # bool first: bool is a subclass of int; an int is accepted for a float key
        try:
            g[key] = {'true': True, 'false': False}[val.lower()] if kind is bool else kind(val)
        except (KeyError, ValueError):
            want = 'True or False' if kind is bool else kind.__name__
            raise SystemExit(f"--{key}={val}: expected {want} (default {g[key]!r})")
        # float('nan') and float('inf') parse, but no key means them
        if kind is float and not math.isfinite(g[key]):
            raise SystemExit(f"--{key}={val}: expected a finite number (default {g[key]!r})")
    # the rules after every override, so that each sees the final value
    for key, rule in rules.items():
        v = g[key]
        if isinstance(rule, tuple) and v not in rule:
            raise SystemExit(f"--{key}={v}: valid are {', '.join(rule)}")
        # a rule's only letter v is the value (eval of our own source text, never of user input)
        if isinstance(rule, str) and not eval(rule, {'v': v}):
            raise SystemExit(f"--{key}={v}: valid is {rule.replace('v', key)}")
    return {k: g[k] for k in keys}

# This process under torchrun (or alone): (ddp, rank, world, device), with the process group set
# up (NCCL on GPUs, gloo on CPUs) and this rank's GPU selected.
def start(device):
    ddp = 'RANK' in os.environ
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = pick_device(device)
    if ddp:
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
    return ddp, rank, world, device

# The device of this process: 'cuda' is this rank's GPU under torchrun. A device this machine lacks
# is a user mistake like any other: one line that lists the devices it has.
def pick_device(name):
    # torch.device('cuda:7') parses on any machine: only the count says it is there
    have = ['cpu'] + [f'cuda:{i}' for i in range(torch.cuda.device_count())]
    want = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if name == 'cuda' else name
    if want not in have:
        raise SystemExit(f"--device={name}: this machine has {', '.join(have)} "
                         f"(torch {torch.__version__}): pass one of those")
    return want

# The dtype of the heavy products on `device` for a key that says 'auto', 'float32' or 'bfloat16':
# 'auto' is bfloat16 where the hardware multiplies it natively (a CUDA GPU that supports it, an x86
# CPU with AMX or AVX-512 BF16) and float32 elsewhere, where bf16 is emulated and slower. Returns
# the dtype's name and a phrase that says why, for the run's one line about it.
def pick_dtype(name, device):
    if name != 'auto':
        return name, 'as asked'
    if device.startswith('cuda'):
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float32', 'on this GPU'
    flags = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
    if ' amx_bf16' in flags or ' avx512_bf16' in flags:
        return 'bfloat16', 'this CPU has native bf16 (AMX or AVX-512 BF16)'
    return 'float32', 'no native bf16 here'

# Hold an advisory lock on folder/lock while this process lives, so that a second run into the same
# folder refuses at the start. The kernel drops the lock when its process dies: a lock left by a
# killed run never blocks the next one. `other`: the way out besides waiting. Keep the returned
# file open.
def lock(folder, other='pass another --out_dir'):
    # a path through a regular file, or a folder this user cannot write: one line, before any work
    try:
        os.makedirs(folder, exist_ok=True)
        # 'a+' opens without truncating: a run that loses the race can still read the pid
        f = open(Path(folder) / 'lock', 'a+')
    except OSError as e:
        raise SystemExit(f"'{folder}' cannot be created or written ({e.strerror}): {other}")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise SystemExit(f"'{folder}' is in use by process {f.read().strip()}: wait for it to "
                         f"finish, or {other}")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f

# Write bytes, text or a dict (as JSON) through a temporary name and os.replace: the old file stays
# whole until the new one is. A full disk or an unwritable folder ends the run with one line, and
# no .tmp.
def write_file(path, data):
    data = json.dumps(data, indent=1) if isinstance(data, dict) else data
    data = data.encode() if isinstance(data, str) else data
    # in the same folder, so os.replace is a rename within one file system: atomic
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"cannot write {path} ({e.strerror}; it needs {len(data) / 2**20:.1f} "
                         f"MiB): free disk space or pass another --out_dir, then rerun the command")

# A JSON file, or {} when there is none.
def read_json(path):
    return json.load(open(path)) if os.path.exists(path) else {}

# The keys whose values differ between a stored config and this run's, as 'key=old (now new)':
# a capture folder or a checkpoint continues only the run it came from.
def config_diff(old, new):
    return ', '.join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in new.items() if old.get(k) != v)

# Under DDP: every rank holds rank 0's weights and theta, bit for bit.
def check_same_weights(sae):
    for p in [*sae.parameters(), sae.theta]:
        ref = p.detach().clone(memory_format=torch.contiguous_format)
        dist.broadcast(ref, 0)
        assert torch.equal(ref, p.detach()), "ranks disagree on the weights"

# Matryoshka's prefix ends from --prefixes: increasing latent counts, the last one all n latents
# ('': n/32, n/16, n/8, n/4 and n).
def prefix_ends(prefixes, n):
    ends = sorted({max(1, n // f) for f in (32, 16, 8, 4, 1)})
    if prefixes:
        ends = [int(p) if p.strip().isdigit() else 0 for p in prefixes.split(',')]
    if ends != sorted(set(ends)) or ends[0] < 1 or ends[-1] != n:
        raise SystemExit(f"--prefixes={prefixes}: valid is increasing latent counts that end at "
                         f"n_latents={n}, e.g. --prefixes={n // 4},{n}")
    return ends

# The capture.py command that recreates a capture, from its config.
def capture_command(config, folder):
    args = ' '.join(f'--{k}={shlex.quote(str(v))}' for k, v in config.items())
    return f"python capture.py {args} --out_dir={folder}"

# A NaN or inf in rows `rows` of the capture in `folder` (x: their activations) would poison every
# weight it touches: stop at the first one, naming its row and its context.
def check_finite(x, rows, folder, fix):
    bad = np.nonzero(~np.isfinite(x).all(1))[0]
    if len(bad):
        r = int(rows[bad[0]])
        ctx = np.load(Path(folder) / 'ctx.npy', mmap_mode='r')[r]
        raise SystemExit(f"NaN or inf at row {r} (context {ctx}): {fix}")

# The meta.json of a finished capture, after checking every array's shape and dtype from its .npy
# header: a copy cut short would otherwise crash halfway with an mmap error. With an SAE's info:
# also that the capture is still there and of the SAE's model and block.
def check_capture(folder, info=None):
    folder = Path(folder)
    if not (folder / 'meta.json').exists():
        what = f"--data_dir={folder} holds no capture: make one with `python capture.py " \
               f"--out_dir={folder}`"
        if (folder / 'acts.npy').exists():
            what = f"--data_dir={folder} is an unfinished capture (no meta.json): rerun its " \
                   f"capture.py command to finish it"
        # the path is stored in the SAE's file: the folder may have moved since training
        if info:
            what = f"the SAE's capture '{folder}' is gone (moved or deleted): recreate it with " \
                   f"`{capture_command(info['capture']['config'], folder)}`"
        raise SystemExit(what)
    # meta.json is written last and atomically: when it is there, it is whole
    meta = read_json(folder / 'meta.json')
    N, C = meta['N'], meta['n_contexts']
    want = {'acts': (N, meta['d_model']), 'tokens': (N,), 'ctx': (N,), 'pos': (N,),
            'first': (C,), 'doc': (C,), 'label': (C,)}
    for name, shape in want.items():
        path = folder / f'{name}.npy'
        promise = f"{shape} {meta['dtype'] if name == 'acts' else 'int32'}"
        # a file cut short fails here: its header promises more bytes than there are
        try:
            a = np.load(path, mmap_mode='r')
            found = f'{a.shape} {a.dtype}'
        except (OSError, ValueError) as e:
            found = str(e)
        if found != promise:
            raise SystemExit(f"{path} is damaged (meta.json promises {promise}, found {found}): "
                             f"recapture with `rm -r {folder} && "
                             f"{capture_command(meta['config'], folder)}`")
    # a folder recaptured from another model or layer would pair the SAE with foreign activations
    if info and (meta['model'], meta['hook']) != (info['model'], info['hook']):
        raise SystemExit(f"'{folder}' holds activations of {meta['model']} {meta['hook']}, but "
                         f"the SAE was trained on {info['model']} {info['hook']}: recapture it")
    return meta

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    t_start = time.time()
    config = configure(globals(), config_keys, rules)
    # -------------------------------------------------------------------------
    # processes: under torchrun each rank trains on its slice of every global batch
    ddp, rank, world, device = start(device)
    # the same seed on every rank: all ranks start from the same weights
    torch.manual_seed(seed)
    log = print if rank == 0 else (lambda *a, **kw: None)
    # only rank 0 writes; a second run into the same folder stops here (the lock lives as long
    # as its open file)
    lock_file = lock(out_dir) if rank == 0 else None

    # -------------------------------------------------------------------------
    # data: a global shuffle over all rows of the capture, whole contexts kept for validation
    meta = check_capture(data_dir)
    out, acts = Path(out_dir), Path(data_dir) / 'acts.npy'
    d = meta['d_model']
    # 16 x d_model by default: 9,216 latents for SmolLM2's 576 dimensions
    n = n_latents or expansion * d
    if not 1 <= k <= n:
        raise SystemExit(f"--k={k}: valid is 1..{n} (n_latents)")
    ends = prefix_ends(prefixes, n)
    # the encoder's product in bf16 where the hardware has it (autocast): said once, in the log;
    # the config (and so the SAE's file and the checkpoint) records the dtype chosen
    dtype, why = pick_dtype(dtype, device)
    config['dtype'] = dtype
    # validation contexts: whole contexts, so no validation token has a neighbour in training;
    # 4 bytes a row
    ctx = np.load(acts.parent / 'ctx.npy')
    val_ctx = np.random.default_rng(seed).random(int(ctx.max()) + 1) < val_frac
    rows, val_rows = (np.nonzero(m)[0].astype(np.int32) for m in (~val_ctx[ctx], val_ctx[ctx]))
    del ctx
    gb = batch_size * world  # the global batch
    if gb > len(rows):
        raise SystemExit(f"--batch_size={batch_size} x {world} ranks is more than the {len(rows)} "
                         f"training rows: lower --batch_size")
    # the rows that do not fill a last global batch wait for the next pass
    per_epoch = len(rows) // gb

    # a fresh permutation of all training rows each pass
    @functools.lru_cache(maxsize=1)
    def epoch_perm(e):
        return np.random.default_rng([seed, e]).permutation(rows)

    # this rank's rows of global step `it`, sorted so that the reads walk the file forwards
    def batch_rows(it):
        j = (it % per_epoch) * gb + rank * batch_size
        return np.sort(epoch_perm(it // per_epoch)[j:j + batch_size])

    # -------------------------------------------------------------------------
    # model and optimizer; resume from out_dir/ckpt.pt when it is there
    # the keys that change the result: a checkpoint resumes only a run with the same ones
    ident = {key: v for key, v in config.items()
             if key not in ('init_from', 'eval_interval', 'log_interval', 'ckpt_interval',
                            'wandb_log', 'wandb_project', 'device', 'out_dir', 'fast')}
    ckpt_path = out / 'ckpt.pt'
    if init_from == 'resume' and not ckpt_path.exists():
        raise SystemExit(f"--init_from=resume: no checkpoint at {ckpt_path}")
    resume = init_from != 'scratch' and ckpt_path.exists()
    # the weights are drawn right after the seed, before any other torch randomness
    sae = SAE(d, n, k, arch, ends).to(device)
    # Gao et al. 2024, section 2.4: the rate falls with the square root of the width
    lr0 = learning_rate or lr_mult * 2e-4 / math.sqrt(n / 2 ** 14)
    opt = make_optimizer(sae, lr0)
    # tokens since each latent last fired: dead means since_fired >= dead_tokens
    since_fired = torch.zeros(n, dtype=torch.long, device=device)
    # 32,768 rows fix one scalar and a median well (OpenAI's code uses the same count); their
    # median norm is also steer.py's unit of strength
    x = read_rows(acts, np.sort(np.random.default_rng(seed).choice(rows, min(len(rows), 32768),
                                                                   replace=False)))
    norm = x.norm(dim=1)
    median, it = norm.median().item(), 0
    if resume:
        it, scale = load_checkpoint(ckpt_path, sae, opt, since_fired, ident, device)
        log(f"resuming from {ckpt_path} at step {it}")
    else:
        # attention sinks past position 0: a few rows with about 100x the median norm (59 of the
        # default 500k, mostly at position 1). BatchTopK would give such a row most of a batch's
        # k*B latents, and each one moves the scale: they are left out of training and
        # evaluation, for every arch
        cut = sink_norm * median if sink_norm else math.inf
        scale = init_from_data(sae, x[norm <= cut])
        sae.max_norm.fill_(cut * scale)
    # the SAE's metadata: steer.py finds the model, the layer and the capture here
    info = {**{key: meta.get(key) for key in ('model', 'layer', 'hook', 'ctx_len', 'd_model', 'N')},
            'n_latents': n, 'data_dir': data_dir, 'capture': meta, 'config': config,
            'median_norm': median}
    if rank == 0 and wandb_log:
        import wandb
        wandb.init(project=wandb_project, config=config)

    # linear warmup, constant, then linear decay to 0
    def lr_at(i):
        warm = min(1, (i + 1) / max(warmup_iters, 1))
        return lr0 * warm * min(1, (max_iters - i) / max(decay_frac * max_iters, 1))

    # validation rows in training-sized batches, so the peak memory does not grow with the set
    def val_batches():
        for j in range(0, len(val_rows), batch_size):
            x = read_rows(acts, val_rows[j:j + batch_size]).to(device) * scale
            yield x[x.norm(dim=1) <= sae.max_norm]

    # dead: never fired on the validation rows, nor in the last dead_tokens tokens of training
    def run_eval():
        r = evaluate(sae, val_batches())
        dead = ((r.pop('count') == 0) & (since_fired >= dead_tokens)).float().mean().item()
        return {**r, 'dead_frac': dead, 'tokens': it * gb}

    # metrics.jsonl: one line per log and eval, rewritten whole, so a full disk never cuts a line
    metrics_path = out / 'metrics.jsonl'
    metrics = open(metrics_path).read().splitlines() if resume and metrics_path.exists() else []

    def record(row):
        metrics.append(json.dumps(row))
        write_file(metrics_path, '\n'.join(metrics) + '\n')

    # -------------------------------------------------------------------------
    # training loop
    log(f"{meta['N']} activations of {meta['hook']} (d={d}) -> {n} latents, {arch}, k={k}, "
        f"lr {lr0:.2e}, scale {scale:.4g}, {len(rows)} train / {len(val_rows)} val rows, global "
        f"batch {gb}, {max_iters} steps, {world} process(es), "
        f"{'fast' if fast and arch in FAST else 'plain'} path, encoder product in {dtype} ({why})")
    # a finished run, rerun: nothing to do
    if it >= max_iters and (out / 'sae_weights.safetensors').exists():
        log(f"{out_dir} already holds this run, trained for {it} steps")
        raise SystemExit(0)
    # one thread reads the next batch from disk while this one trains
    pool = ThreadPoolExecutor(1)
    nxt = pool.submit(read_rows, acts, batch_rows(it))
    t0 = t_log = time.time()
    it_log = it0 = it
    while it < max_iters:
        # the batch read in the background, scaled so that E||s x||^2 = d
        x = nxt.result().to(device) * scale
        x = x[x.norm(dim=1) <= sae.max_norm]
        if it + 1 < max_iters:
            nxt = pool.submit(read_rows, acts, batch_rows(it + 1))
        fvu, aux, l0 = train_step(sae, opt, x, since_fired, lr_at(it), config)
        it += 1
        # log: the speed since the last log line, in activations per second over all ranks
        if it % log_interval == 0 or it == max_iters:
            rate = (it - it_log) * gb / (time.time() - t_log)
            t_log, it_log = time.time(), it
            row = {'iter': it, 'tokens': it * gb, 'fvu': fvu, 'aux': aux, 'l0': l0,
                   'dead_pct': 100 * (since_fired >= dead_tokens).float().mean().item(),
                   'lr': lr_at(it - 1), 'acts_per_s': rate}
            eta = (time.time() - t0) / (it - it0) * (max_iters - it)
            log(' | '.join(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}"
                           for key, v in row.items()) + f" | ETA {eta:.0f}s", flush=True)
            if rank == 0:
                record(row)
                if wandb_log:
                    wandb.log(row)
        # eval on the validation contexts (the final one comes after the loop)
        if rank == 0 and len(val_rows) and it % eval_interval == 0 and it < max_iters:
            ev = run_eval()
            log(f"eval step {it}: fvu {ev['fvu']:.4f} | l0 {ev['l0']:.1f} | dead "
                f"{100 * ev['dead_frac']:.2f}% | {ev['tokens']} tokens seen")
            record({'iter': it, 'eval': ev})
        # checkpoint: everything that a resumed run needs to continue exactly
        if rank == 0 and (it % ckpt_interval == 0 or it == max_iters):
            save_checkpoint(ckpt_path, sae, opt, since_fired, it, scale, ident)

    # -------------------------------------------------------------------------
    # report: every rank holds the same weights (an invariant worth checking), then rank 0 saves
    if ddp:
        check_same_weights(sae)
    if rank == 0:
        # the final validation goes into the SAE's metadata too
        ev = run_eval() if len(val_rows) else {}
        record({'iter': it, 'eval': ev})
        info.update(iters=it, tokens=it * gb, eval=ev, train_seconds=round(time.time() - t0, 1))
        save_sae(sae, scale, out_dir, info)
        log(f"saved {out_dir}/sae_weights.safetensors: fvu {ev.get('fvu', float('nan')):.4f}, "
            f"l0 {ev.get('l0', 0):.1f}, dead {100 * ev.get('dead_frac', 0):.2f}%, "
            f"{it * gb / (time.time() - t0):.0f} activations/s over {time.time() - t0:.0f}s; "
            f"sae.py done in {time.time() - t_start:.0f}s")
    # ranks leave together: none tears down while rank 0 still writes. What still holds the group
    # (in reference cycles) goes now, while the interpreter is whole: left to its exit, gloo's
    # threads aborted rank 1 at exit in 13 of 90 two-rank runs here, and 0 of 80 with this
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
