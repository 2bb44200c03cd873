"""nanoSAE tests: CPU only, no network. Tiny Llama models are built from a config, trained for a moment on a
small corpus and saved with save_pretrained, so the real from_pretrained(path) path runs. Scripts run as
subprocesses, the way the README runs them. `-m "not slow"` skips the one test on the real offline default.
$ python -m pytest -q test_sae.py
"""
import os, sys, json, math, signal, shutil, subprocess, time, html.parser
import numpy as np
import pytest
import torch
from safetensors import safe_open
from sae import TopKSAE, configure, topk, losses, update_dead, train_step, evaluate, save_sae, load_sae, read_rows
from capture import run_to_layer, blocks
from steer import attach, steer_fn, evaluate_lm, sae_fn

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore'}
WORDS = 'the a river city king music atom cell war song law sun ocean moon map tree stone iron art god'.split()
CFG = dict(dead_tokens=10**9, k_aux=8, auxk_coef=1 / 32, grad_clip=1.0, fast=True, dtype='float32')

def run(*args, ok=True, nproc=0, **kw):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc else []) + [str(a) for a in args]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900, **kw)
    assert not ok or p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p

def fails(args, match, out=None):
    """A user mistake: exit 1, one line on stderr naming the problem, no traceback, nothing that looks complete."""
    p = run(*args, ok=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and match in err[0] and 'Traceback' not in p.stderr, p.stderr
    assert out is None or not os.path.exists(os.path.join(out, 'meta.json'))

@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    """A 4-block Llama (d=64) with a byte-level tokenizer, trained briefly on a corpus of word salad, and a
    float32 capture of block 1 (ctx_len 32) made by capture.py."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp('tiny')
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token='</s>')
    rng = np.random.default_rng(0)
    docs = [' '.join(rng.choice(WORDS, rng.integers(3, 60))) + '.' for _ in range(40)]
    os.makedirs(root / 'corpus')
    for i, doc in enumerate(docs): (root / 'corpus' / f'{i:02d}.txt').write_text(doc)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    opt = torch.optim.Adam(lm.parameters(), 3e-3)
    ids = torch.tensor(tok(' '.join(docs)).input_ids[:64 * 32]).view(32, 64)
    for _ in range(120):  # enough that the residual stream at block 1 matters for the loss
        lm(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    lm.save_pretrained(root / 'model'); tok.save_pretrained(root / 'model')
    cap = root / 'cap'
    run('capture.py', f'--model={root / "model"}', f'--data={root / "corpus"}', '--layer=1', '--ctx_len=32', '--dtype=float32', '--batch_size=4', f'--out_dir={cap}')
    return {'root': root, 'model': str(root / 'model'), 'corpus': str(root / 'corpus'), 'cap': str(cap), 'docs': docs, 'tok': tok,
            'cap_args': [f'--model={root / "model"}', f'--data={root / "corpus"}', '--layer=1', '--ctx_len=32', '--dtype=float32', '--batch_size=4']}

@pytest.fixture(scope='session')
def trained(tiny):
    out = tiny['root'] / 'sae'
    run('sae.py', f'--data_dir={tiny["cap"]}', f'--out_dir={out}', '--n_latents=256', '--k=8', '--batch_size=128', '--max_iters=300', '--dead_tokens=4000', '--val_frac=0.1')
    return str(out)

def load_lm(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).eval()

# ----------------------------------------------------------------------------- config and capture
def test_configure():
    g = {'__doc__': 'doc', 'lr': 0.5, 'n': 3, 'on': False, 'name': 'x'}
    assert configure(g, list(g)[1:], ['--lr=2', '--on=true', '--name=y']) == {'lr': 2.0, 'n': 3, 'on': True, 'name': 'y'}
    for bad, msg in ((['--nope=1'], 'unknown config key'), (['--n=1.5'], 'expected int'), (['n=2'], 'bad argument'), (['--on=maybe'], 'True or False')):
        with pytest.raises(SystemExit, match=msg): configure(g, list(g)[1:], bad)

def test_capture_rows_are_the_residual_stream_of_their_tokens(tiny):
    """Every row is hidden_states[layer + 1] of its context at its position; contexts are exactly the documents cut
    into 32-token pieces, position 0 excluded and recorded, no padding stored."""
    lm, tok, cap = load_lm(tiny['model']), tiny['tok'], tiny['cap']
    acts, tokens, ctx, pos, first = (np.load(os.path.join(cap, f + '.npy')) for f in ('acts', 'tokens', 'ctx', 'pos', 'first'))
    meta = json.load(open(os.path.join(cap, 'meta.json')))
    assert meta['excluded'] == 'position 0 of every context' and meta['hook'] == 'model.layers.1' and acts.shape == (meta['N'], 64)
    got = []
    for c in range(ctx.max() + 1):
        rows = np.nonzero(ctx == c)[0]
        ids = [int(first[c])] + tokens[rows].tolist()
        assert pos[rows].tolist() == list(range(1, len(ids)))
        hs = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(torch.from_numpy(acts[rows]), hs[2][0, 1:], atol=1e-5, rtol=1e-5)
        got.append(ids)
    want = [ids[s:s + 32] for d in tiny['docs'] for ids in [tok(d).input_ids] for s in range(0, len(ids), 32) if len(ids[s:s + 32]) > 1]
    assert sorted(got) == sorted(want) and len(acts) == sum(len(w) - 1 for w in want)

def test_hook_stops_the_forward_and_last_block_is_before_final_norm(tiny):
    lm = load_lm(tiny['model'])
    ids = torch.tensor([tiny['tok'](tiny['docs'][0]).input_ids[:20]])
    hs = lm(ids, output_hidden_states=True).hidden_states
    name, blist = blocks(lm)
    calls = []
    blist[2].register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(run_to_layer(lm, blist[1], ids), hs[2])
    assert calls == []  # blocks after the hooked one never ran
    n_hooks = len(blist[1]._forward_hooks)  # transformers keeps hooks of its own there
    with pytest.raises(IndexError): run_to_layer(lm, blist[1], ids + 10_000)  # a forward that fails leaves no hook behind
    assert len(blist[1]._forward_hooks) == n_hooks
    last = run_to_layer(lm, blist[3], ids)  # HF's last hidden state has the final norm applied; the block output has not
    assert not torch.allclose(last, hs[4], atol=1e-3) and torch.allclose(lm.model.norm(last), hs[4], atol=1e-5)

def test_capture_resume_is_byte_identical_and_refuses_other_configs(tiny, tmp_path):
    """A kill leaves some batches flagged done and others unflagged, maybe with rows already (half) written."""
    out = tmp_path / 'cap'
    shutil.copytree(tiny['cap'], out)
    done = np.load(out / 'done.npy')
    done[1::2] = 0  # odd batches unflagged, their rows (contexts 4b..4b+3) garbage
    np.save(out / 'done.npy', done)
    a = np.load(out / 'acts.npy', mmap_mode='r+'); a[np.load(out / 'ctx.npy') // 4 % 2 == 1] = np.nan; a.flush(); del a
    os.remove(out / 'meta.json')
    run('capture.py', *tiny['cap_args'], f'--out_dir={out}')
    for f in os.listdir(tiny['cap']):  # all but the measured speed in meta.json
        same = lambda p: open(p, 'rb').read() if f != 'meta.json' else {**json.load(open(p)), 'tokens_per_s': 0}
        assert same(out / f) == same(os.path.join(tiny['cap'], f)), f
    fails(['capture.py', *tiny['cap_args'], '--layer=2', f'--out_dir={out}'], 'holds a different capture')

def test_capture_torchrun_gloo_holds_the_same_rows(tiny, tmp_path):
    run('capture.py', *tiny['cap_args'], f'--out_dir={tmp_path}', nproc=2)
    for f in ('acts.npy', 'tokens.npy', 'ctx.npy', 'pos.npy', 'first.npy'):
        assert (tmp_path / f).read_bytes() == open(os.path.join(tiny['cap'], f), 'rb').read(), f

def test_capture_bad_input(tiny, tmp_path):
    out, m, c = str(tmp_path / 'o'), f'--model={tiny["model"]}', f'--data={tiny["corpus"]}'
    os.makedirs(tmp_path / 'empty'); (tmp_path / 'empty' / 'a.txt').write_text('  \n')
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin1'))
    fails(['capture.py', m, '--data=/no/such/corpus', f'--out_dir={out}'], 'no corpus at', out)
    fails(['capture.py', m, f'--data={tmp_path / "empty"}', f'--out_dir={out}'], 'holds no text', out)
    fails(['capture.py', m, f'--data={tmp_path / "latin1.txt"}', f'--out_dir={out}'], 'is not UTF-8', out)
    fails(['capture.py', m, c, '--layer=4', f'--out_dir={out}'], 'blocks 0..3', out)
    fails(['capture.py', m, c, '--layer=1', '--ctx_len=100000', f'--out_dir={out}'], 'valid is 2..256', out)
    fails(['capture.py', '--model=/no/such/model', c, f'--out_dir={out}'], 'pass a local folder', out)
    lm = load_lm(tiny['model'])  # a model whose residual stream overflows float16
    with torch.no_grad(): lm.model.embed_tokens.weight *= 1e6
    lm.save_pretrained(tmp_path / 'big'); tiny['tok'].save_pretrained(tmp_path / 'big')
    fails(['capture.py', f'--model={tmp_path / "big"}', c, '--layer=0', f'--out_dir={out}'], 'rerun with --dtype=float32', out)
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(tmp_path / 'full')], capture_output=True,
                      preexec_fn=lambda: os.makedirs(tmp_path / 'full', exist_ok=True)).returncode == 0:
        try: fails(['capture.py', m, c, '--layer=1', f'--out_dir={tmp_path / "full"}'], 'free disk space', str(tmp_path / 'full'))
        finally: subprocess.run(['umount', str(tmp_path / 'full')])

# ----------------------------------------------------------------------------- the SAE (shared/CHECKLIST.md 1-10)
def make(d=16, n=64, k=4, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(d, n, k)
    with torch.no_grad(): sae.b_dec.normal_(0, 2); sae.b_enc.normal_(0, 0.1)
    return sae, torch.randn(256, d) * 3 + 1

def test_1_4_decoder_rows_unit_and_gradient_orthogonal_every_step():
    sae, x = make()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    since = torch.zeros(64, dtype=torch.long)
    for _ in range(5):
        W_old = sae.W_dec.detach().clone()
        train_step(sae, opt, x, since, 1e-2, CFG)
        assert sae.W_dec.shape == (64, 16) and sae.W_enc.shape == (16, 64)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
        assert (sae.W_dec.grad * W_old).sum(1).abs().max() < 1e-6  # the step's gradient had no part along its row
        assert (sae.W_dec.detach() - W_old).norm() > 0

@pytest.mark.parametrize('device,n', [('cpu', 64), ('cpu', 2048)] + [('cuda', 2048)] * torch.cuda.is_available())
def test_2_3_10_auxk_and_the_fast_path(device, n):
    """AuxK has no b_dec and a detached residual; the fast path (our top-k at n=2048) equals dense autograd (float32, bf16)."""
    sae, x = (t.to(device) for t in make(n=n))
    dead = torch.arange(n, device=device) >= n // 2
    fvu, aux, vals, idx = losses(sae, x, dead, 8, fast=True)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # an independent computation of both losses
    v, i = pre.topk(4); recon = (v.relu()[..., None] * sae.W_dec[i]).sum(1) + sae.b_dec
    av, ai = pre.masked_fill(~dead, -1e9).topk(8); e = x - recon
    e_hat = (av.relu()[..., None] * sae.W_dec[ai]).sum(1)  # no b_dec
    torch.testing.assert_close(fvu, (e ** 2).sum() / ((x - x.mean(0)) ** 2).sum()); torch.testing.assert_close(sae.decode(*sae.encode(x)), recon)  # eval's path too
    torch.testing.assert_close(aux, ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum())
    aux.backward()
    live_fired = torch.unique(idx[vals > 0]); live_fired = live_fired[~dead[live_fired]]
    assert len(live_fired) and sae.W_dec.grad[live_fired].abs().max() == 0 and sae.enc.grad[live_fired].abs().max() == 0
    grads = {}
    for fast, bf16 in ((True, False), (False, False), (True, True), (False, True)):
        sae.zero_grad()
        with torch.autocast(device, torch.bfloat16, enabled=bf16): f, a, _, _ = losses(sae, x, dead, 8, fast=fast)
        (f + a / 32).backward()
        grads[fast, bf16] = [f.detach(), a.detach()] + [p.grad.clone() for p in sae.parameters()]
    for g_fast, g_dense in zip(grads[True, False], grads[False, False]): torch.testing.assert_close(g_fast, g_dense, rtol=1e-4, atol=1e-6)
    for g_fast, g_dense in zip(grads[True, True], grads[False, True]):  # bf16 rounds pre: a near-tie may pick another latent
        assert (g_fast - g_dense).norm() < (0.01 if g_fast.dim() == 0 else 0.1) * g_dense.norm()

def test_topk_equals_torch_topk():
    """The top-k through column maxima gives torch.topk's values: also with ties, AuxK's -inf mask, any width."""
    g = torch.Generator().manual_seed(0)
    for pre in (torch.randn(64, 2048, generator=g), torch.randint(0, 6, (64, 2048), generator=g).float(), torch.randn(64, 1000, generator=g),
                torch.randn(64, 2048, generator=g).masked_fill(torch.arange(2048) % 7 > 0, -math.inf)):
        vals, idx = topk(pre, 16)
        assert torch.equal(vals.sort(1).values, pre.topk(16).values.sort(1).values) and torch.equal(pre.gather(1, idx), vals) \
            and (idx.sort(1).values.diff(dim=1) > 0).all()  # 16 distinct latents per row

def test_5_dead_latents_are_counted_in_tokens():
    """Latent j fires until token 128 * j; with dead_tokens = 640, two batch sizes give the same dead set."""
    T, n = 2048, 16
    fires = torch.arange(T)[:, None] < 128 * torch.arange(n)[None]  # (T, n)
    result = []
    for B in (64, 128):
        since = torch.zeros(n, dtype=torch.long)
        for s in range(0, T, B):
            vals = fires[s:s + B].float(); update_dead(since, vals, torch.arange(n).expand(B, n), B)
        result.append(since >= 640)
    assert torch.equal(result[0], result[1]) and result[0].tolist() == [j * 128 <= T - 640 for j in range(n)]

def test_6_fvu_uses_the_global_mean():
    sae, _ = make(n=32, k=16)
    batches = [torch.randn(100, 16) + 5 * i for i in range(4)]  # batch means differ: a per-batch mean gives another answer
    with torch.no_grad(): sae.W_enc.zero_(); sae.b_enc.zero_(); sae.b_dec.copy_(torch.cat(batches).mean(0))
    assert abs(evaluate(sae, batches)['fvu'] - 1) < 1e-6  # predicting the global mean
    ident = TopKSAE(16, 32, 16)  # +e_i and -e_i as latents: exactly one of each pair is positive, so recon = x
    with torch.no_grad():
        ident.W_dec.copy_(torch.cat([torch.eye(16), -torch.eye(16)])); ident.W_enc.copy_(ident.W_dec.T); ident.b_dec.zero_()
    assert evaluate(ident, batches)['fvu'] < 1e-10

def test_7_8_saved_sae_folds_the_scale_and_round_trips(tmp_path):
    sae, x = make()
    s = 0.37
    save_sae(sae, s, str(tmp_path), {'model': 'm', 'layer': 3, 'hook': 'model.layers.3', 'ctx_len': 32})
    loaded, info = load_sae(str(tmp_path))
    v1, i1 = loaded.encode(x); v0, i0 = sae.encode(s * x)
    torch.testing.assert_close(loaded(x), sae(s * x) / s, rtol=1e-4, atol=1e-5)
    assert torch.equal(i1, i0) and torch.allclose(v1, v0 / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), loaded.W_dec.norm(dim=1))
    again, _ = load_sae(str(tmp_path))
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), again.parameters())) and torch.equal(loaded(x), again(x))
    with safe_open(str(tmp_path / 'sae_weights.safetensors'), 'pt') as f:
        m = f.metadata()
        assert (m['k'], float(m['scale']), m['layer'], m['model']) == ('4', s, '3', 'm') and f.get_tensor('W_enc').shape == (16, 64)
    cfg = json.load(open(tmp_path / 'cfg.json'))  # SAELens's TopK layout
    assert (cfg['architecture'], cfg['d_in'], cfg['d_sae'], cfg['k']) == ('topk', 16, 64, 4)

def test_planted_dictionary_is_recovered():
    """Sparse non-negative combinations of 64 known unit directions: the SAE finds at least 90% of them."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(64, 32, generator=g); true /= true.norm(dim=1, keepdim=True)
    def data(B):
        z = torch.zeros(B, 64).scatter_(1, torch.rand(B, 64, generator=g).topk(3).indices, torch.rand(B, 3, generator=g) + 0.5)
        return z @ true + 0.01 * torch.randn(B, 32, generator=g)
    torch.manual_seed(0); sae = TopKSAE(32, 128, 3)
    opt, since = torch.optim.Adam(sae.parameters(), lr=3e-3), torch.zeros(128, dtype=torch.long)
    for i in range(1500): train_step(sae, opt, data(512), since, 3e-3 * min(1, (1500 - i) / 300), {**CFG, 'dead_tokens': 50_000})
    assert (true @ sae.W_dec.detach().T).max(1).values.gt(0.9).float().mean() >= 0.9

def test_9_torchrun_gloo_equals_one_process(tiny, tmp_path):
    args = [f'--data_dir={tiny["cap"]}', '--n_latents=256', '--k=8', '--max_iters=30', '--dead_tokens=1500', '--warmup_iters=5']
    run('sae.py', *args, '--batch_size=128', f'--out_dir={tmp_path / "one"}')
    run('sae.py', *args, '--batch_size=64', f'--out_dir={tmp_path / "two"}', nproc=2)  # asserts identical weights on both ranks
    a, b = load_sae(str(tmp_path / 'one'))[0], load_sae(str(tmp_path / 'two'))[0]
    for p, q in zip(a.parameters(), b.parameters()): torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)

def test_resume_after_kill_equals_uninterrupted(tiny, tmp_path):
    args = ['sae.py', f'--data_dir={tiny["cap"]}', '--n_latents=512', '--k=8', '--batch_size=256', '--max_iters=400', '--ckpt_interval=20', '--dead_tokens=3000']
    run(*args, f'--out_dir={tmp_path / "a"}')
    p = subprocess.Popen([sys.executable] + args + [f'--out_dir={tmp_path / "b"}'], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / 'b' / 'ckpt.pt').exists() and p.poll() is None: time.sleep(0.005)
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (tmp_path / 'b' / 'sae_weights.safetensors').exists()  # it really was interrupted
    assert 'resuming from' in run(*args, f'--out_dir={tmp_path / "b"}').stdout
    for p, q in zip(load_sae(str(tmp_path / 'a'))[0].parameters(), load_sae(str(tmp_path / 'b'))[0].parameters()): torch.testing.assert_close(p, q, rtol=0, atol=1e-6)

def test_sae_bad_input(tiny, trained, tmp_path):
    cap, out = tiny['cap'], f'--out_dir={tmp_path / "o"}'
    fails(['sae.py', f'--data_dir={tmp_path / "none"}', out], 'python capture.py --out_dir=')
    shutil.copytree(cap, tmp_path / 'partial'); os.remove(tmp_path / 'partial' / 'meta.json')
    fails(['sae.py', f'--data_dir={tmp_path / "partial"}', out], 'unfinished capture')
    fails(['sae.py', f'--data_dir={cap}', '--k=0', out], 'valid is 1..')
    fails(['sae.py', f'--data_dir={cap}', '--dtype=float16', out], 'valid are float32, bfloat16')
    fails(['sae.py', f'--data_dir={cap}', '--batch_size=100000', out], 'lower --batch_size')
    shutil.copytree(cap, tmp_path / 'nan')
    a = np.load(tmp_path / 'nan' / 'acts.npy', mmap_mode='r+'); a[7, 3] = np.inf; a.flush(); del a
    fails(['sae.py', f'--data_dir={tmp_path / "nan"}', '--batch_size=64', out], 'at row 7')
    fails(['sae.py', f'--data_dir={cap}', f'--out_dir={trained}', '--n_latents=256', '--k=9'], 'different config')

# ----------------------------------------------------------------------------- steering and evaluation
def test_steering_hooks(tiny, trained):
    lm, (sae, info) = load_lm(tiny['model']), load_sae(trained)
    block = blocks(lm)[1][1]
    ids = torch.tensor([tiny['tok'](tiny['docs'][1]).input_ids[:24]])
    clean = lm(ids).logits
    for fn in (steer_fn(sae, 5, 0.0, 'add'), lambda h: h):
        h = attach(block, fn); assert torch.equal(lm(ids).logits, clean); h.remove()
    assert torch.equal(lm(ids).logits, clean)
    x = run_to_layer(lm, block, ids)[0, 1:]  # clamping a latent to its current value changes nothing
    vals, idx = sae.encode(x)
    i, f = idx[0, vals[0].argmax()].item(), vals[0].max().item()
    torch.testing.assert_close(steer_fn(sae, i, f, 'clamp')(x[:1]), x[:1])
    seen = []  # the hook acts on tokens generated with the KV cache (seq_len 1 steps)
    h1 = attach(block, lambda h: seen.append(h) or steer_fn(sae, i, 3.0, 'add')(h))
    h2 = block.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    lm.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0); h1.remove(); h2.remove()
    steps = [(seen[j], seen[j + 1]) for j in range(0, len(seen), 2) if seen[j].shape[1] == 1]
    assert len(steps) == 3 and all(torch.allclose(post - pre, 3.0 * sae.W_dec[i].detach()) for pre, post in steps)

def test_loss_recovered(tiny, trained):
    lm, (sae, info) = load_lm(tiny['model']), load_sae(trained)
    ctxs = [np.array(tiny['tok'](d).input_ids[:32], np.int32) for d in tiny['docs'][:12]]
    r = evaluate_lm(lm, blocks(lm)[1][1], sae, ctxs, 1, 4, 'cpu')
    assert abs(r['ce_spliced+error'] - r['ce_clean']) < 1e-4 and r['ce_clean'] < r['ce_spliced'] < r['ce_zero_ablated'] and r['kl'] > 0 and 0 < r['loss_recovered_pct'] < 100

def test_browser_page_shows_each_latents_top_contexts(tiny, trained):
    run('steer.py', f'--sae_path={trained}', '--browse=True', '--browse_latents=20', '--n_examples=3')
    sae, info = load_sae(trained)
    class Page(html.parser.HTMLParser):
        latents, stack = {}, []
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if a.get('class') == 'latent': self.cur = int(a['id'][1:]); self.latents[self.cur] = []
            if tag == 'li': self.latents[self.cur].append([])
            self.stack.append(tag)
        def handle_endtag(self, tag): self.stack.pop()
        def handle_data(self, data):
            if self.stack and self.stack[-1] == 'mark': self.latents[self.cur][-1].append(data)
    page = Page(); page.feed(open(os.path.join(trained, 'browser.html')).read())
    vals, idx = sae.encode(read_rows(os.path.join(tiny['cap'], 'acts.npy'), np.arange(json.load(open(os.path.join(tiny['cap'], 'meta.json')))['N'])))
    z = torch.zeros(len(vals), 256).scatter_(1, idx, vals)
    tokens = np.load(os.path.join(tiny['cap'], 'tokens.npy'))
    assert len(page.latents) == 20
    for i, examples in page.latents.items():
        assert examples and all(len(marks) == 1 for marks in examples)  # one highlighted token per context
        assert examples[0][0] == tiny['tok'].decode([int(tokens[z[:, i].argmax()])])  # the top context holds the top row's token

def test_steer_bad_input(tiny, trained, tmp_path):
    fails(['steer.py', f'--sae_path={tmp_path}'], 'no SAE at')
    fails(['steer.py', f'--sae_path={trained}', '--prompt=hi', '--latent=256'], 'latents 0..255')
    fails(['steer.py', f'--sae_path={trained}', '--prompt= '], '--prompt is empty')
    sae, info = load_sae(trained)
    save_sae(TopKSAE(32, 64, 4), 1.0, str(tmp_path / 'narrow'), info)
    fails(['steer.py', f'--sae_path={tmp_path / "narrow"}', '--eval=True'], 'does not match')
    save_sae(sae, 1.0, str(tmp_path / 'gone'), {**info, 'model': '/no/such/model'})
    fails(['steer.py', f'--sae_path={tmp_path / "gone"}', '--eval=True'], 'pass a local folder')

@pytest.mark.slow
def test_real_default_pipeline(tmp_path):
    """The offline default: SmolLM2-135M-Instruct (GGUF) on the Wikipedia corpus, a few thousand tokens."""
    cap, out = tmp_path / 'cap', tmp_path / 'sae'
    run('capture.py', '--max_tokens=3000', f'--out_dir={cap}')
    run('sae.py', f'--data_dir={cap}', f'--out_dir={out}', '--batch_size=256', '--max_iters=40', '--expansion=4')
    r = run('steer.py', f'--sae_path={out}', '--eval_tokens=600', '--browse_latents=10')
    ev = json.load(open(out / 'eval.json'))
    assert 1 < ev['ce_clean'] < 5 and abs(ev['ce_spliced+error'] - ev['ce_clean']) < 1e-3 and ev['ce_spliced'] < ev['ce_zero_ablated']
    assert (out / 'browser.html').exists() and 'loss_recovered_pct' in r.stdout
