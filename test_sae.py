"""nanoSAE tests: CPU only, no network. Tiny Llama models are built from a config, trained for a
moment on a small corpus and saved with save_pretrained (or written as GGUF), so the real
from_pretrained(path) path runs. Scripts run by their command line, in this process (runpy) or,
where a kill, a lock, torchrun or the real model needs one, as subprocesses. Each test checks
behaviour against an independent truth, named in its docstring.
$ python -m pytest -q test_sae.py                    # -k "not real_default" skips the real model
"""
import os, re, io, gc, sys, json, math, html, time, runpy, signal, shutil, builtins, threading
import functools
import subprocess
# before transformers is imported: the tests never reach for the hub, and the scripts run here
# as they run alone (they turn tqdm off before torch loads it; here it is loaded already)
os.environ.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TQDM_DISABLE='1')
from contextlib import redirect_stdout, redirect_stderr
from collections import Counter
from pathlib import Path
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
import capture, sae as sae_script, steer
from sae import (SAE, configure, topk, batch_top_k, fast_batch_top_k, losses, fast_losses,
                 global_var, update_dead, train_step, evaluate, save_sae, load_sae, read_rows,
                 make_optimizer, init_from_data, check_capture)
from capture import run_to_layer, blocks
from steer import attach, steer_fn, evaluate_lm

# torch's notice for the CSR product in sae.rows_grad (sae.py silences it; pytest resets filters)
pytestmark = pytest.mark.filterwarnings('ignore:Sparse CSR tensor support is in beta')

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
       'PYTHONWARNINGS': 'ignore'}
WORDS = ('the a river city king music atom cell war song law sun ocean moon map tree stone iron '
         'art god').split()
CFG = dict(dead_tokens=10**9, k_aux=8, auxk_coef=1 / 32, grad_clip=1.0, dtype='float32',
           theta_rate=0.01, fast=True)
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")

def command(*args, nproc=0):
    torchrun = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    return [sys.executable] + (torchrun if nproc else []) + [str(a) for a in args]

def run(*args, ok=True, nproc=0, env=None, alone=False):
    """A script by its command line. In this process (runpy, as `python script.py` runs it: the
    same argv, SystemExit's message on stderr and exit code 1), which spares each run the start
    of an interpreter and the imports; `alone` (or torchrun) in a process of its own."""
    if alone or nproc:
        p = subprocess.run(command(*args, nproc=nproc), cwd=REPO, env=env or ENV,
                           capture_output=True, text=True, timeout=900)
    else:
        out, err, code, saved = io.StringIO(), io.StringIO(), 0, (sys.argv, dict(os.environ))
        sys.argv = [str(a) for a in args]
        os.environ.update(env or {})
        try:
            with redirect_stdout(out), redirect_stderr(err):
                runpy.run_path(os.path.join(REPO, args[0]), run_name='__main__')
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            err.write(f'{e.code}\n' if isinstance(e.code, str) else '')
        finally:
            sys.argv = saved[0]
            os.environ.clear()
            os.environ.update(saved[1])
            # the script's globals (its lock on out_dir among them) are freed now, as at exit
            gc.collect()
        p = subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())
    assert not ok or p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p

def fails(args, match, out=None, leaves=('meta.json', 'sae_weights.safetensors'), alone=False):
    """A user mistake: exit 1, one line on stderr holding every string of `match`, no traceback,
    and no file in `leaves` (what would look complete) left in `out`."""
    p = run(*args, ok=False, alone=alone)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1, p.stderr[-3000:]
    assert all(m in err[0] for m in ([match] if isinstance(match, str) else match)), err[0]
    for name in leaves if out else ():
        assert not os.path.exists(os.path.join(out, name)), name
    return err[0]

# three merges, so that 'yes' and 'no' are one token each, as a scorer's answer is
MERGES = [('y', 'e'), ('ye', 's'), ('n', 'o')]

def byte_tokenizer():
    """Byte-level BPE: every byte a token, plus the merges' tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in MERGES]
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(vocab)}, merges=MERGES))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token='</s>')

@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    """A 4-block Llama (d=64) with a byte-level tokenizer, trained briefly on a corpus of word
    salad, and a float32 capture of block 1 (ctx_len 32) made by capture.py."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root, tok = tmp_path_factory.mktemp('tiny'), byte_tokenizer()
    rng = np.random.default_rng(0)
    docs = [' '.join(rng.choice(WORDS, rng.integers(3, 60))) + '.' for _ in range(40)]
    os.makedirs(root / 'corpus')
    for i, doc in enumerate(docs):
        (root / 'corpus' / f'{i:02d}.txt').write_text(doc)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256))
    opt = torch.optim.Adam(lm.parameters(), 3e-3)
    ids = torch.tensor(tok(' '.join(docs)).input_ids[:64 * 32]).view(32, 64)
    # enough steps that the residual stream at block 1 matters for the loss
    for _ in range(120):
        lm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    lm.save_pretrained(root / 'model')
    tok.save_pretrained(root / 'model')
    cap_args = [f'--model={root / "model"}', f'--data={root / "corpus"}', '--layer=1',
                '--ctx_len=32', '--dtype=float32', '--batch_size=4']
    run('capture.py', *cap_args, f'--out_dir={root / "cap"}')
    return {'root': root, 'model': str(root / 'model'), 'corpus': str(root / 'corpus'),
            'cap': str(root / 'cap'), 'docs': docs, 'tok': tok, 'cap_args': cap_args}

# topk: the truths of the tests that use these SAEs assume exactly k codes per row; the default
# (batchtopk) runs in the real pipeline, resume and every-arch tests
SAE_ARGS = ['--n_latents=256', '--k=8', '--batch_size=128', '--max_iters=300',
            '--dead_tokens=4000', '--val_frac=0.1', '--arch=topk']

@pytest.fixture(scope='session')
def trained(tiny):
    out = tiny['root'] / 'sae'
    run('sae.py', f'--data_dir={tiny["cap"]}', f'--out_dir={out}', *SAE_ARGS)
    return str(out)

@pytest.fixture(scope='session')
def labelled(tiny):
    """The tiny corpus as a .jsonl with a label per document (3 classes), captured like `tiny`,
    and an SAE trained on that capture."""
    root = tiny['root']
    with open(root / 'labelled.jsonl', 'w') as f:
        for i, doc in enumerate(tiny['docs']):
            f.write(json.dumps({'text': doc, 'label': f'topic{i % 3}'}) + '\n')
    args = [a for a in tiny['cap_args'] if not a.startswith('--data=')]
    args.append(f'--data={root / "labelled.jsonl"}')
    run('capture.py', *args, f'--out_dir={root / "lcap"}')
    run('sae.py', f'--data_dir={root / "lcap"}', f'--out_dir={root / "lsae"}', *SAE_ARGS)
    return {'cap': str(root / 'lcap'), 'sae': str(root / 'lsae'), 'args': args}

@pytest.fixture(scope='session')
def chat_model(tiny):
    """The tiny model with a chat template: an instruct model as far as steer.py can tell."""
    from transformers import AutoTokenizer
    path = tiny['root'] / 'chat'
    shutil.copytree(tiny['model'], path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return str(path)

def load_lm(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).eval()

# ----------------------------------------------------------------------------- config, mistakes
def test_configure_parses_types_and_checks_rules():
    """Types come from the defaults; every rule is checked, and a mistake is one line."""
    g = {'__doc__': 'doc', 'lr': 0.5, 'n': 3, 'on': False, 'name': 'x'}
    rules = {'n': 'v >= 1', 'name': ('x', 'y')}
    got = configure(g, list(g)[1:], rules, ['--lr=2', '--on=true', '--name=y'])
    assert got == {'lr': 2.0, 'n': 3, 'on': True, 'name': 'y'}
    for bad, msg in ((['--nope=1'], 'unknown config key'), (['--n=1.5'], 'expected int'),
                     (['n=2'], 'bad argument'), (['--on=maybe'], 'True or False'),
                     (['--lr=nan'], 'finite'), (['--n=0'], 'valid is n >= 1'),
                     (['--name=z'], 'valid are x, y')):
        with pytest.raises(SystemExit, match=msg):
            configure(dict(g), list(g)[1:], rules, bad)

# an out-of-range value for every numeric key of each script; None: the range depends on the
# model or the data, so it is checked once they are loaded (the bad-input table runs those)
BAD = {capture: {'layer': None, 'ctx_len': None, 'max_tokens': 0, 'batch_size': 0,
                 'log_seconds': 0, 'dtype': 'int8', 'compute_dtype': 'float64'},
       sae_script: {'expansion': 0, 'n_latents': -1, 'k': None, 'batch_size': 0, 'max_iters': 0,
                    'learning_rate': -0.1, 'lr_mult': 0, 'warmup_iters': -1, 'decay_frac': 1.5,
                    'grad_clip': 0, 'auxk_coef': -1, 'k_aux': -1, 'dead_tokens': -1,
                    'val_frac': 1, 'eval_interval': 0, 'log_interval': 0, 'ckpt_interval': 0,
                    'seed': -1, 'dtype': 'float16', 'init_from': 'x', 'arch': 'relu',
                    'theta_rate': 0, 'sink_norm': -1},
       steer: {'eval_tokens': 0, 'latent': -2, 'strength': 'inf', 'max_new_tokens': 0,
               'temperature': -1, 'seed': -1, 'top_latents': 0, 'browse_latents': -1,
               'n_examples': 0, 'batch_size': 0, 'mode': 'push', 'explain': -1,
               'requests_in_flight': 0, 'timeout': 0, 'verify': -1}}

@pytest.mark.parametrize('script', BAD, ids=lambda m: m.__name__)
def test_every_numeric_key_is_range_checked(script, tmp_path):
    """Each numeric key has a bad value in the table (a new key without one fails here), and
    each bad value ends configure with one line naming the key; as a real run: exit 1, one
    line, and no out_dir created (the check comes before any work). No key shadows a builtin."""
    numeric = {k for k in script.config_keys if type(getattr(script, k)) in (int, float)}
    assert numeric <= set(BAD[script]) and not set(script.config_keys) & set(dir(builtins))
    for key, bad in BAD[script].items():
        if bad is not None:
            with pytest.raises(SystemExit, match=f'^--{key}=') as e:
                configure(dict(vars(script)), script.config_keys, script.rules, [f'--{key}={bad}'])
            assert '\n' not in str(e.value.code)
    key = next(k for k, v in BAD[script].items() if v is not None)
    args = [f'{script.__name__}.py', f'--{key}={BAD[script][key]}']
    if 'out_dir' in script.config_keys:
        args.append(f'--out_dir={tmp_path / "out"}')
    fails(args, f'--{key}=', alone=True)
    assert not (tmp_path / 'out').exists()

@pytest.mark.parametrize('script', ['capture.py', 'sae.py', 'steer.py'])
def test_a_missing_device_is_one_line(script, tmp_path):
    """A GPU index beyond the ones present (always missing, with or without CUDA)."""
    gone = f'cuda:{torch.cuda.device_count()}'
    args = [script, f'--device={gone}']
    if script != 'steer.py':
        args.append(f'--out_dir={tmp_path / "o"}')
    err = fails(args, 'this machine has cpu')
    assert f'--device={gone}' in err and not (tmp_path / 'o').exists()

def write_gguf(lm, tok, path, template):
    """The model as a GGUF file, written with gguf's own writer the way llama.cpp lays out a
    Llama: its tensor names, q and k rows permuted, the tokenizer and the chat template inside."""
    import gguf
    c, w = lm.config, gguf.GGUFWriter(path, 'llama')
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters['rope_theta'])
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    w.add_tokenizer_model('gpt2')
    w.add_token_list(vocab)
    w.add_token_types([1] * len(vocab))
    w.add_token_merges([' '.join(m) for m in MERGES])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.eos_token_id)
    if template:
        w.add_chat_template(template)
    names = {'model.embed_tokens.weight': 'token_embd', 'model.norm.weight': 'output_norm',
             'lm_head.weight': 'output'}
    for i in range(c.num_hidden_layers):
        for a, b in (('self_attn.q_proj', 'attn_q'), ('self_attn.k_proj', 'attn_k'),
                     ('self_attn.v_proj', 'attn_v'), ('self_attn.o_proj', 'attn_output'),
                     ('mlp.gate_proj', 'ffn_gate'), ('mlp.up_proj', 'ffn_up'),
                     ('mlp.down_proj', 'ffn_down'), ('input_layernorm', 'attn_norm'),
                     ('post_attention_layernorm', 'ffn_norm')):
            names[f'model.layers.{i}.{a}.weight'] = f'blk.{i}.{b}'
    for key, v in lm.state_dict().items():
        x = v.float().numpy()
        # llama.cpp's rotary layout: each head's two halves interleaved
        h = {'q_proj': c.num_attention_heads, 'k_proj': c.num_key_value_heads}.get(
            key.split('.')[-2])
        if h:
            x = x.reshape(h, 2, -1, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
        w.add_tensor(names[key] + '.weight', x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

@pytest.fixture(scope='session')
def broken(tiny, trained, labelled, tmp_path_factory):
    """The inputs a user gets wrong, made once: an empty and a latin-1 corpus, a model that
    overflows float16, captures unfinished, cut short, of the wrong dtype or holding a NaN, SAEs
    of another width, model, place or layer, and GGUF files that are not, or have no template."""
    root, cap = tmp_path_factory.mktemp('broken'), tiny['cap']
    os.makedirs(root / 'empty')
    (root / 'empty' / 'a.txt').write_text('  \n')
    (root / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin1'))
    lm = load_lm(tiny['model'])
    with torch.no_grad():
        lm.model.embed_tokens.weight *= 1e6
    lm.save_pretrained(root / 'big')
    tiny['tok'].save_pretrained(root / 'big')
    damage = {'partial': lambda c: os.remove(c / 'meta.json'),
              'cut': lambda c: os.truncate(c / 'acts.npy', os.path.getsize(c / 'acts.npy') - 1000),
              'int64': lambda c: np.save(c / 'ctx.npy', np.load(c / 'ctx.npy').astype(np.int64))}
    for name, f in damage.items():
        shutil.copytree(cap, root / name)
        f(root / name)
    shutil.copytree(cap, root / 'nan')
    a = np.load(root / 'nan' / 'acts.npy', mmap_mode='r+')
    a[7, 3] = np.inf
    a.flush()
    del a
    sae, info = load_sae(trained)
    save_sae(SAE(32, 64, 4), 1.0, str(root / 'narrow'), {**info, 'n_latents': 64})
    save_sae(sae, 1.0, str(root / 'nomodel'), {**info, 'model': '/no/such/model'})
    # the SAE's capture moved away, or replaced by one of another layer
    for name in ('moved', 'relayered'):
        shutil.copytree(cap, root / f'{name}-cap')
        save_sae(sae, 1.0, str(root / name), {**info, 'data_dir': str(root / f'{name}-cap')})
    os.rename(root / 'moved-cap', root / 'elsewhere')
    meta = json.load(open(root / 'relayered-cap' / 'meta.json'))
    meta['hook'] = 'model.layers.2'
    (root / 'relayered-cap' / 'meta.json').write_text(json.dumps(meta))
    (root / 'fake.gguf').write_text('not a model')
    write_gguf(load_lm(tiny['model']), tiny['tok'], str(root / 'plain.gguf'), '')
    return {'root': root, 'm': f'--model={tiny["model"]}', 'c': f'--data={tiny["corpus"]}',
            'cap': cap, 'sae': trained, 'lsae': labelled['sae'], 'model': tiny['model']}

# (what is wrong, the command with {keys} of `broken`, what the one line must say)
BAD_INPUT = [
    ('no corpus', 'capture.py {m} --data=/no/such/corpus', 'no corpus at'),
    ('empty corpus', 'capture.py {m} --data={root}/empty', 'holds no text'),
    ('not utf-8', 'capture.py {m} --data={root}/latin1.txt', 'is not UTF-8'),
    ('layer', 'capture.py {m} {c} --layer=4', 'blocks 0..3'),
    ('ctx_len', 'capture.py {m} {c} --layer=1 --ctx_len=100000', 'valid is 2..256'),
    ('no model', 'capture.py --model=/no/such/model {c}', 'pass a local folder'),
    ('float16 overflow', 'capture.py --model={root}/big {c} --layer=0', '--dtype=float32'),
    ('out_dir below a file', 'capture.py {m} {c} --out_dir={root}/latin1.txt/cap',
     'cannot be created'),
    ('no capture', 'sae.py --data_dir={root}/none', 'python capture.py --out_dir='),
    ('sae out_dir below a file', 'sae.py --data_dir={cap} --out_dir={root}/latin1.txt/sae',
     'cannot be created'),
    ('unfinished', 'sae.py --data_dir={root}/partial', 'unfinished capture'),
    ('cut short', 'sae.py --data_dir={root}/cut',
     ('acts.npy is damaged', 'python capture.py --model={model}', '--layer=1')),
    ('wrong dtype', 'sae.py --data_dir={root}/int64', ('ctx.npy is damaged', '--layer=1')),
    ('nan', 'sae.py --data_dir={root}/nan --batch_size=64', 'at row 7'),
    ('k', 'sae.py --data_dir={cap} --k=0', 'valid is 1..'),
    ('prefixes', 'sae.py --data_dir={cap} --arch=matryoshka --n_latents=256 --prefixes=64,32,256',
     ('increasing latent counts', '--prefixes=64,256')),
    ('batch', 'sae.py --data_dir={cap} --batch_size=100000', 'lower --batch_size'),
    ('other config', 'sae.py --data_dir={cap} --out_dir={sae} --n_latents=256 --k=9',
     'different config'),
    ('no sae', 'steer.py --sae_path={root}/none', 'no SAE at'),
    ('sae below a file', 'steer.py --sae_path={root}/latin1.txt/sae', 'no SAE at'),
    ('latent', 'steer.py --sae_path={sae} --prompt=hi --latent=256', 'latents 0..255'),
    ('empty prompt', 'steer.py --sae_path={sae} --prompt= ', '--prompt is empty'),
    ('width', 'steer.py --sae_path={root}/narrow --evaluate=True {c}', 'does not match'),
    ('sae model', 'steer.py --sae_path={root}/nomodel --evaluate=True {c}', 'pass a local folder'),
    ('no unseen text', 'steer.py --sae_path={sae} --evaluate=True', '--data= is needed'),
    ('capture gone', 'steer.py --sae_path={root}/moved --browse=True',
     ('is gone', 'python capture.py --model={model}')),
    ('capture layer', 'steer.py --sae_path={root}/relayered --browse=True', 'recapture it'),
    ('no labels', 'steer.py --sae_path={sae} --probe=True', 'needs document labels'),
    ('no template', 'steer.py --sae_path={lsae} --explain=2', 'has no chat template'),
    ('gguf no template', 'steer.py --sae_path={lsae} --explain=2 --explainer={root}/plain.gguf',
     'has no chat template'),
    ('not gguf', 'steer.py --sae_path={lsae} --explain=2 --explainer={root}/fake.gguf',
     'is not a GGUF file'),
    ('too many', 'steer.py --sae_path={lsae} --explain=100000 --explainer={chat}',
     'pass at most'),
    ('latents', 'steer.py --sae_path={lsae} --latents=3,x', 'comma-separated'),
    ('latents range', 'steer.py --sae_path={lsae} --latents=3,99999', 'comma-separated'),
    ('no endpoint', 'steer.py --sae_path={lsae} --explain=1 --explainer=http://127.0.0.1:9/v1 '
     '--explainer_model=m', 'no answer from http://127.0.0.1:9/v1'),
    ('no endpoint model', 'steer.py --sae_path={lsae} --explain=1 --explainer=http://x/v1',
     '--explainer_model='),
    ('verify too many', 'steer.py --sae_path={lsae} --verify=100000 {c}', 'pass at most'),
    ('verify latent', 'steer.py --sae_path={lsae} --verify=1 --latents=99999', '0..'),
    ('verify capture gone', 'steer.py --sae_path={root}/moved --verify=1', 'is gone'),
]

@pytest.mark.parametrize('what,args,match', BAD_INPUT, ids=[r[0] for r in BAD_INPUT])
def test_bad_input_is_one_line(broken, chat_model, what, args, match, tmp_path):
    """Exit 1, one line that says what is wrong and what fixes it, no traceback; nothing that
    looks complete is left behind (a capture's meta.json, an SAE, a steer.py output)."""
    keys = {**broken, 'chat': chat_model}
    args = args.format(**keys).split(' ')
    args = [a if a != '--prompt=' else '--prompt= ' for a in args if a]
    out = tmp_path / 'o'
    if args[0] != 'steer.py' and not any(a.startswith('--out_dir=') for a in args):
        args.append(f'--out_dir={out}')
    fails(args, tuple(m.format(**keys) for m in ([match] if isinstance(match, str) else match)),
          str(out))
    for name in ('browser.html', 'interp.json', 'verify.json'):
        assert not os.path.exists(broken['root'] / 'moved' / name)

def test_a_full_disk_is_one_line_and_keeps_what_was_whole(tiny, tmp_path):
    """A disk too small for acts.npy (a 64 KiB tmpfs) fails capture at the start, leaving no
    array and no plan; the disk filling while the second checkpoint is written fails training
    with one line, no .tmp, and the first checkpoint whole. Where mounting is not allowed, the
    checkpoint's .tmp is a link to /dev/full (writes there fail with ENOSPC)."""
    full = tmp_path / 'full'
    os.makedirs(full)
    mount = ['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(full)]
    if subprocess.run(mount).returncode == 0:
        try:
            fails(['capture.py', *tiny['cap_args'], f'--out_dir={full}'], 'free disk space',
                  str(full), leaves=['acts.npy', 'plan.json', 'meta.json'])
        finally:
            subprocess.run(['umount', str(full)])
    args = ['sae.py', f'--data_dir={tiny["cap"]}', '--n_latents=256', '--k=8', '--batch_size=128',
            '--max_iters=40', '--ckpt_interval=20', '--log_interval=100']
    run(*args, f'--out_dir={tmp_path / "probe"}')
    size = os.path.getsize(tmp_path / 'probe' / 'ckpt.pt')
    out = tmp_path / 'sae'
    os.makedirs(out)
    mount = ['mount', '-t', 'tmpfs', '-o', f'size={int(size * 1.5) + 65536}', 'tmpfs', str(out)]
    mounted = subprocess.run(mount, capture_output=True).returncode == 0
    if not mounted:
        os.symlink('/dev/full', out / 'ckpt.pt.tmp')
    try:
        err = fails([*args, f'--out_dir={out}'], ('No space left on device', 'ckpt.pt', 'MiB'),
                    str(out), leaves=['ckpt.pt.tmp', 'sae_weights.safetensors'])
        assert 'cannot write' in err
        if mounted:
            assert torch.load(out / 'ckpt.pt', weights_only=False)['iter'] == 20
    finally:
        if mounted:
            subprocess.run(['umount', str(out)])

# ----------------------------------------------------------------------------- capture
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_capture_rows_are_the_residual_stream_of_their_tokens(tiny, dtype, tmp_path):
    """Every row is hidden_states[layer + 1] of its context at its position (HF's own output, in
    float32): to 1e-5 from a float32 forward pass; from a bfloat16 one (the default where the CPU
    multiplies bf16 natively), as close as HF's own bf16 forward pass is (within twice its error,
    on average and at worst: bf16 rounds differently by kernel, and its error has long tails);
    contexts are exactly the documents cut into 32-token pieces, position 0 excluded and
    recorded, no padding stored."""
    cap = str(tmp_path / 'cap')
    run('capture.py', *tiny['cap_args'], f'--compute_dtype={dtype}', f'--out_dir={cap}')
    lm, tok = load_lm(tiny['model']), tiny['tok']
    lm16 = load_lm(tiny['model']).to(torch.bfloat16)
    acts, tokens, ctx, pos, first = (np.load(os.path.join(cap, f + '.npy'))
                                     for f in ('acts', 'tokens', 'ctx', 'pos', 'first'))
    meta = json.load(open(os.path.join(cap, 'meta.json')))
    assert meta['config']['exclude_first'] is True and meta['hook'] == 'model.layers.1'
    assert acts.shape == (meta['N'], 64) and meta['forward_dtype'] == dtype
    got, errors = [], []
    for c in range(ctx.max() + 1):
        rows = np.nonzero(ctx == c)[0]
        ids = [int(first[c])] + tokens[rows].tolist()
        assert pos[rows].tolist() == list(range(1, len(ids)))
        hs = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, 1:]
        a = torch.from_numpy(acts[rows])
        if dtype == 'float32':
            torch.testing.assert_close(a, hs, atol=1e-5, rtol=1e-5)
        hf16 = lm16(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, 1:]
        errors.append(torch.stack([(a - hs).norm(dim=1), (hf16.float() - hs).norm(dim=1)], 1))
        got.append(ids)
    ours, hf = torch.cat(errors).T.detach()
    assert ours.mean() < 2 * hf.mean() and ours.max() < 2 * hf.max()
    # the truth: the tokenizer's ids of each document, cut every 32 tokens
    want = [ids[s:s + 32] for d in tiny['docs'] for ids in [tok(d).input_ids]
            for s in range(0, len(ids), 32) if len(ids[s:s + 32]) > 1]
    assert sorted(got) == sorted(want) and len(acts) == sum(len(w) - 1 for w in want)

def test_hook_stops_the_forward_and_last_block_is_before_final_norm(tiny):
    """The hooked block's output equals hidden_states[layer + 1], and later blocks never run; the
    last block's output is HF's last hidden state before the final norm."""
    lm = load_lm(tiny['model'])
    ids = torch.tensor([tiny['tok'](tiny['docs'][0]).input_ids[:20]])
    hs = lm(ids, output_hidden_states=True).hidden_states
    name, blist = blocks(lm)
    calls = []
    blist[2].register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(run_to_layer(lm, blist[1], ids), hs[2])
    assert calls == []
    # a forward that fails leaves no hook behind (transformers keeps hooks of its own there)
    n_hooks = len(blist[1]._forward_hooks)
    with pytest.raises(IndexError):
        run_to_layer(lm, blist[1], ids + 10_000)
    assert len(blist[1]._forward_hooks) == n_hooks
    last = run_to_layer(lm, blist[3], ids)
    assert not torch.allclose(last, hs[4], atol=1e-3)
    assert torch.allclose(lm.model.norm(last), hs[4], atol=1e-5)

def test_capture_resume_is_byte_identical_and_refuses_other_configs(tiny, tmp_path):
    """A kill leaves some batches flagged done and others unflagged, maybe with rows already
    (half) written: the resumed capture equals the uninterrupted one byte for byte."""
    out = tmp_path / 'cap'
    shutil.copytree(tiny['cap'], out)
    done = np.load(out / 'done.npy')
    done[1::2] = 0  # odd batches unflagged, their rows (contexts 4b..4b+3) garbage
    np.save(out / 'done.npy', done)
    a = np.load(out / 'acts.npy', mmap_mode='r+')
    a[np.load(out / 'ctx.npy') // 4 % 2 == 1] = np.nan
    a.flush()
    del a
    os.remove(out / 'meta.json')
    run('capture.py', *tiny['cap_args'], f'--out_dir={out}')
    # every file but the lock (its holder's pid) and the measured speed in meta.json
    for f in set(os.listdir(tiny['cap'])) - {'lock'}:
        if f == 'meta.json':
            same = lambda p: {**json.load(open(p)), 'tokens_per_s': 0}
        else:
            same = lambda p: open(p, 'rb').read()
        assert same(out / f) == same(os.path.join(tiny['cap'], f)), f
    fails(['capture.py', *tiny['cap_args'], '--layer=2', f'--out_dir={out}'],
          'holds a different capture')

def test_capture_torchrun_gloo_holds_the_same_rows(tiny, tmp_path):
    """Two gloo ranks put every row where one process does: tokens, contexts, positions, first
    tokens and documents byte-identical. Activations agree to the storage dtype's precision
    (float16 here: at most one unit in the last place from the one-process float32 values):
    torchrun gives each rank one BLAS thread, and BLAS sums differ in the last bits."""
    run('capture.py', *tiny['cap_args'], '--dtype=float16', f'--out_dir={tmp_path}', nproc=2)
    for f in ('tokens.npy', 'ctx.npy', 'pos.npy', 'first.npy', 'doc.npy', 'label.npy'):
        assert (tmp_path / f).read_bytes() == open(os.path.join(tiny['cap'], f), 'rb').read(), f
    two = np.load(tmp_path / 'acts.npy').astype(np.float32)
    one = np.load(os.path.join(tiny['cap'], 'acts.npy')).astype(np.float16).astype(np.float32)
    ulp = np.maximum(np.spacing(np.abs(one).astype(np.float16)),
                     np.spacing(np.abs(two).astype(np.float16)))
    assert two.shape == one.shape and (np.abs(two - one) <= ulp).all()

def test_capture_records_each_contexts_document_and_label(tiny, labelled):
    """doc.npy and label.npy against the corpus: each context's tokens are a piece of its
    document's tokens, and its label is that document's."""
    cap = labelled['cap']
    meta = json.load(open(os.path.join(cap, 'meta.json')))
    assert meta['labels'] == ['topic0', 'topic1', 'topic2']
    doc, label = np.load(os.path.join(cap, 'doc.npy')), np.load(os.path.join(cap, 'label.npy'))
    tokens, ctx = np.load(os.path.join(cap, 'tokens.npy')), np.load(os.path.join(cap, 'ctx.npy'))
    first = np.load(os.path.join(cap, 'first.npy'))
    for c in range(meta['n_contexts']):
        ids = tiny['tok'](tiny['docs'][doc[c]]).input_ids
        piece = [int(first[c])] + tokens[ctx == c].tolist()
        assert any(ids[s:s + len(piece)] == piece for s in range(0, len(ids), 32))
        assert meta['labels'][label[c]] == f'topic{doc[c] % 3}'
    assert (np.load(os.path.join(tiny['cap'], 'label.npy')) == -1).all()

# ------------------------------------------- the SAE: each detail of the recipe, against a truth
def make(d=16, n=64, k=4, seed=0, arch='topk'):
    torch.manual_seed(seed)
    sae = SAE(d, n, k, arch, [n // 8, n // 4, n // 2, n])
    with torch.no_grad():
        sae.b_dec.normal_(0, 2)
        sae.b_enc.normal_(0, 0.1)
    return sae, torch.randn(256, d) * 3 + 1

def dense(vals, lat, rows, shape):
    """Flat codes (values, latents, rows) as a dense (B, n) matrix."""
    return torch.zeros(shape, dtype=vals.dtype).index_put_((rows, lat), vals, accumulate=True)

def test_the_plain_loss_is_the_recipe():
    """sae.losses, the plain path, against the checklist's formulas computed here in float64 numpy,
    row by row: pre = (x - b_dec) W_enc + b_enc; each row's k largest, relu'd; recon = z W_dec +
    b_dec; FVU around the batch mean; AuxK from the k_aux largest pre-activations of dead latents
    only, relu'd, decoded without b_dec, regressing the residual (detached: no gradient reaches
    the live latents that fired). Matryoshka adds each shorter prefix's FVU from the one
    selection; a matryoshka that selects again in each prefix would give another loss."""
    sae, x = make(n=64)
    dead = torch.arange(64) >= 40
    loss, aux, fvu, z, fired = losses(sae, x, dead, 3, global_var(x))
    P = {k: v.detach().double().numpy() for k, v in sae.named_parameters()}
    X = x.double().numpy()
    pre = (X - P['b_dec']) @ P['W_enc'] + P['b_enc']
    Z, A = np.zeros_like(pre), np.zeros_like(pre)
    for r in range(len(X)):
        top = np.argsort(-pre[r])[:4]
        Z[r, top] = np.maximum(pre[r, top], 0)
        d = np.nonzero(dead.numpy())[0]
        top = d[np.argsort(-pre[r, d])[:3]]
        A[r, top] = np.maximum(pre[r, top], 0)
    recon = Z @ P['W_dec'] + P['b_dec']
    var = lambda t: ((t - t.mean(0)) ** 2).sum()
    e = X - recon
    assert np.allclose(z.detach().numpy(), Z, atol=1e-5)
    assert fired.tolist() == (Z > 0).any(0).tolist()
    assert np.isclose(fvu.item(), (e ** 2).sum() / var(X), rtol=1e-5) and loss.item() == fvu.item()
    assert np.isclose(aux.item(), ((e - A @ P['W_dec']) ** 2).sum() / var(e), rtol=1e-5)
    # with b_dec in the aux reconstruction the value would differ
    assert not np.isclose(aux.item(), ((e - A @ P['W_dec'] - P['b_dec']) ** 2).sum() / var(e))
    aux.backward()
    live_fired = torch.nonzero(fired & ~dead).flatten()
    assert len(live_fired) and sae.W_dec.grad[live_fired].abs().max() == 0
    assert sae.W_enc.grad[:, live_fired].abs().max() == 0
    # matryoshka: the batch's k*B largest, then every prefix's FVU from that one selection
    m, x = make(n=64, arch='matryoshka')
    loss = losses(m, x, dead, 0, global_var(x))[0].item()
    P = {k: v.detach().double().numpy() for k, v in m.named_parameters()}
    pre = (x.double().numpy() - P['b_dec']) @ P['W_enc'] + P['b_enc']
    flat = np.maximum(pre, 0).flatten()
    Z = np.zeros_like(flat)
    keep = np.argsort(-flat, kind='stable')[:4 * len(x)]
    Z[keep] = flat[keep]
    Z = Z.reshape(pre.shape)
    fvus = [((x.double().numpy() - (Z * (np.arange(64) < e)) @ P['W_dec'] - P['b_dec']) ** 2).sum()
            / var(x.double().numpy()) for e in m.ends]
    assert np.isclose(loss, sum(fvus), rtol=1e-5)
    # a matryoshka that selects again in each prefix (SAELens's first version) gives another loss
    again, X = 0, x.double().numpy()
    for e in m.ends:
        p = np.maximum(pre[:, :e], 0)
        Zp = np.where(p >= np.sort(p.flatten())[-4 * len(x)], p, 0)
        again += ((X - Zp @ P['W_dec'][:e] - P['b_dec']) ** 2).sum() / var(X)
    assert abs(again - loss) > 1e-3 * loss

def test_batch_selection_is_the_batchs_k_largest():
    """The plain batch_top_k keeps what the definition says (relu(pre)'s k*B largest entries of the
    whole batch, ties to the lower row-major index: no kept entry is below a dropped one, and at
    the cut kept entries come first), and the fast selection keeps the same entries: with ties
    (small integers), rows far from the rest (which hold most of the selection), fewer positive
    entries than k*B or none at all, and a width where the candidates are the whole batch (the
    wide ones go two levels of column maxima deep). Rows keep unequal counts, which a per-row
    top-k could never give."""
    g = torch.Generator().manual_seed(0)
    far = torch.randn(128, 2048, generator=g)
    far[:3] *= 40
    cases = [torch.randn(256, 2048, generator=g), torch.randint(-3, 4, (256, 2048), generator=g),
             far, torch.randn(64, 2048, generator=g) - 3.5, torch.randn(64, 48, generator=g),
             -torch.rand(8, 64, generator=g)]
    sae = SAE(2, 2, 16)
    for pre in cases:
        pre = pre.float()
        z = batch_top_k(pre, sae)
        v, kept = pre.relu().flatten(), z.flatten() > 0
        K = min(16 * len(pre), int((v > 0).sum()))
        assert kept.sum() == K and torch.equal(z.flatten()[kept], v[kept])
        if 0 < K < len(v):
            low, high = v[kept].min(), v[~kept].max()
            assert low >= high and (low > high or
                                    torch.nonzero(kept & (v == low)).max() <
                                    torch.nonzero(~kept & (v == high)).min())
        assert torch.equal(dense(*fast_batch_top_k(pre, 16), pre.shape), z)
    counts = (batch_top_k(cases[0], sae) > 0).sum(1)
    assert counts.min() < 16 < counts.max()
    # the far rows hold most of their batch's 16 * 128
    assert (batch_top_k(far, sae) > 0).sum(1)[:3].min() > 100

def test_topk_equals_torch_topk():
    """The fast path's top-k through column maxima gives torch.topk's values: also with ties, AuxK's
    -inf mask, any width; and k distinct latents per row."""
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(2048) % 7 > 0
    for pre in (torch.randn(64, 2048, generator=g),
                torch.randint(0, 6, (64, 2048), generator=g).float(),
                torch.randn(64, 1000, generator=g),
                torch.randn(64, 2048, generator=g).masked_fill(mask, -math.inf)):
        vals, idx = topk(pre, 16)
        assert torch.equal(vals.sort(1).values, pre.topk(16).values.sort(1).values)
        assert torch.equal(pre.gather(1, idx), vals) and (idx.sort(1).values.diff(dim=1) > 0).all()

def cut_margin(pre, arch, k):
    """The smallest gap, at the arch's cut, between a pre-activation that is selected and one that
    is not. The two paths compute pre with different float roundings (a few 1e-6 here): where every
    gap is far above that, they must select the same latents, on every machine; a near-tie could
    go either way, so each comparison below first checks that its data has none (2e-5: 10 times
    the rounding)."""
    if arch == 'topk':
        top = pre.topk(k + 1, dim=1).values
        return (top[:, k - 1] - top[:, k]).min().item()
    v = pre.relu().flatten().topk(k * len(pre) + 1).values
    return (v[-2] - v[-1]).item()

@pytest.mark.parametrize('arch', ['topk', 'batchtopk', 'matryoshka'])
@pytest.mark.parametrize('device', ['cpu'] + ['cuda'] * torch.cuda.is_available())
def test_the_fast_path_is_the_plain_path(arch, device):
    """For each arch, the fast path (exact selections, a sparse backward, a bag decode, scratch
    buffers) gives the plain path's selection, loss, AuxK, FVU and every gradient (float32, on data
    with no near-tie at any cut), and the same weights and theta after 5 training steps in
    lockstep; under bf16 autocast the same to bf16's precision (it rounds pre, so a near-tie may
    pick another latent: a relative bound)."""
    for n in (64, 2048):
        sae, x = make(n=n, arch=arch)
        sae, x = sae.to(device), x.to(device)
        dead = torch.arange(n, device=device) >= n // 2
        with torch.no_grad():
            pre = sae.pre(x)
        assert cut_margin(pre, arch, sae.k) > 2e-5
        assert cut_margin(pre.masked_fill(~dead, -math.inf), 'topk', 8) > 2e-5
        got = {}
        for fast, bf16 in ((True, False), (False, False), (True, True), (False, True)):
            sae.zero_grad()
            with torch.autocast(device, torch.bfloat16, enabled=bf16):
                loss, aux, fvu, z, fired = (fast_losses if fast else losses)(sae, x, dead, 8,
                                                                             global_var(x))
            (loss + aux / 32).backward()
            got[fast, bf16] = [loss.detach(), aux.detach(), fvu.detach()] + \
                [p.grad.clone() for p in sae.parameters()]
            if not bf16:
                got[fast, 'fired'] = fired
        for fast, plain in zip(got[True, False], got[False, False]):
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)
        assert torch.equal(got[True, 'fired'], got[False, 'fired'])
        for fast, plain in zip(got[True, True], got[False, True]):
            assert (fast - plain).norm() < (0.01 if fast.dim() == 0 else 0.1) * plain.norm()
    # the same selection from the same pre: the plain codes against the fast path's flat codes
    select = sae_script.FAST[arch]
    assert torch.equal(dense(*select(pre, sae.k), pre.shape),
                       sae_script.ARCHS[arch]['select'](pre, sae))
    # the same weights and theta after 5 steps of each path in lockstep, each step's data checked
    # for near-ties (no dead latents: no AuxK)
    saes, x = [make(n=256, arch=arch)[0] for _ in range(2)], x[:64].cpu()
    opts, sinces = [make_optimizer(s, 1e-3) for s in saes], [torch.zeros(256).long() for _ in saes]
    for _ in range(5):
        with torch.no_grad():
            assert cut_margin(saes[0].pre(x), arch, 4) > 2e-5
        for sae, opt, since, fast in zip(saes, opts, sinces, (True, False)):
            train_step(sae, opt, x, since, 1e-3, {**CFG, 'fast': fast})
    for p, q in zip([*saes[0].parameters(), saes[0].theta], [*saes[1].parameters(), saes[1].theta]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize('fast', [True, False])
def test_decoder_rows_stay_unit_and_their_gradient_orthogonal(fast):
    """After every step each decoder row (one per latent, W_dec (n, d)) has unit norm, and the
    gradient the step used had no component along its row."""
    sae, x = make()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    since = torch.zeros(64, dtype=torch.long)
    for _ in range(5):
        W_old = sae.W_dec.detach().clone()
        train_step(sae, opt, x, since, 1e-2, {**CFG, 'fast': fast})
        assert sae.W_dec.shape == (64, 16) and sae.W_enc.shape == (16, 64)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
        assert (sae.W_dec.grad * W_old).sum(1).abs().max() < 1e-6
        assert (sae.W_dec.detach() - W_old).norm() > 0

def test_dead_latents_are_counted_in_tokens():
    """Latent j fires until token 128 * j; with dead_tokens = 640, two batch sizes give the same
    dead set, the one computed by hand."""
    T, n = 2048, 16
    fires = torch.arange(T)[:, None] < 128 * torch.arange(n)[None]  # (T, n)
    result = []
    for B in (64, 128):
        since = torch.zeros(n, dtype=torch.long)
        for s in range(0, T, B):
            update_dead(since, fires[s:s + B].any(0), B)
        result.append(since >= 640)
    assert torch.equal(result[0], result[1])
    assert result[0].tolist() == [j * 128 <= T - 640 for j in range(n)]

def test_fvu_is_around_the_global_mean():
    """Predicting the global mean gives FVU 1 (batch means differ, so a per-batch mean gives
    another answer); a perfect reconstruction gives 0."""
    sae, _ = make(n=32, k=16)
    batches = [torch.randn(100, 16) + 5 * i for i in range(4)]
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.cat(batches).mean(0))
    assert abs(evaluate(sae, batches)['fvu'] - 1) < 1e-6
    # +e_i and -e_i as latents: exactly one of each pair is positive, so recon = x
    ident = SAE(16, 32, 16, 'topk')
    with torch.no_grad():
        ident.W_dec.copy_(torch.cat([torch.eye(16), -torch.eye(16)]))
        ident.W_enc.copy_(ident.W_dec.T)
        ident.b_dec.zero_()
    assert evaluate(ident, batches)['fvu'] < 1e-10

def test_the_saved_sae_takes_raw_activations_and_round_trips(tmp_path):
    """The saved SAE on raw x gives recon / s of the training SAE on s*x; loading twice gives the
    same bits; k, the scale, the layer and the model are in the file, in SAELens's layout. A file
    cut short, whose tensors do not fit its metadata, or of an older version (no arch in its
    metadata) is one line saying how to retrain."""
    sae, x = make()
    s, info = 0.37, {'model': 'm', 'layer': 3, 'hook': 'model.layers.3', 'ctx_len': 32,
                     'n_latents': 64}
    save_sae(sae, s, str(tmp_path), info)
    loaded, _ = load_sae(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(s * x) / s, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x), sae.encode(s * x) / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), loaded.W_dec.norm(dim=1))
    again, _ = load_sae(str(tmp_path))
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), again.parameters()))
    with safe_open(str(tmp_path / 'sae_weights.safetensors'), 'pt') as f:
        m = f.metadata()
        assert (m['k'], float(m['scale']), m['layer'], m['model']) == ('4', s, '3', 'm')
        assert f.get_tensor('W_enc').shape == (16, 64)
        t = {name: f.get_tensor(name) for name in f.keys()}
        meta = m
    cfg = json.load(open(tmp_path / 'cfg.json'))
    assert (cfg['architecture'], cfg['d_in'], cfg['d_sae'], cfg['k']) == ('topk', 16, 64, 4)
    save_sae(sae, 1.0, str(tmp_path / 'wrong'), {**info, 'n_latents': 65})
    from safetensors.torch import save_file
    os.makedirs(tmp_path / 'old')
    old = {k: v for k, v in json.loads(meta['nanosae']).items() if k != 'arch'}
    save_file(t, str(tmp_path / 'old' / 'sae_weights.safetensors'),
              metadata={**meta, 'nanosae': json.dumps(old)})
    f = tmp_path / 'sae_weights.safetensors'
    os.truncate(f, os.path.getsize(f) // 2)
    for bad in (tmp_path, tmp_path / 'wrong', tmp_path / 'old'):
        with pytest.raises(SystemExit, match='is not a whole nanoSAE file of this version') as e:
            load_sae(str(bad))
        assert '\n' not in str(e.value.code) and 'python sae.py' in str(e.value.code)

def test_the_optimizer_has_no_weight_decay():
    """A step whose gradients are all zero leaves every weight unchanged (Adam's update is
    m / sqrt(v) = 0; any weight decay would shrink the weights)."""
    sae, _ = make()
    opt = make_optimizer(sae, 1e-2)
    before = [p.detach().clone() for p in sae.parameters()]
    for p in sae.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(sae.parameters(), before))

def test_b_dec_starts_at_the_geometric_median():
    """On a sample with a few far outliers, the initial b_dec equals an independent Weiszfeld
    computation (numpy, float64) on the scaled sample, and is far from the mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) + 3
    x[:20] += 1000
    sae = SAE(8, 32, 4)
    s = init_from_data(sae, x)
    assert abs(s - math.sqrt(8 / x.double().pow(2).sum(1).mean().item())) < 1e-6 * s
    y = (x.double() * s).numpy()
    m = np.median(y, 0)
    for _ in range(500):
        w = 1 / np.linalg.norm(y - m, axis=1).clip(1e-12)
        m = (w[:, None] * y).sum(0) / w.sum()
    b = sae.b_dec.detach().double().numpy()
    assert np.abs(b - m).max() < 1e-4 * np.abs(m).max()
    assert np.abs(b - y.mean(0)).max() > 100 * np.abs(b - m).max()

# ------------------------------------------------------------------------ batchtopk, matryoshka
def test_prefix_ends_change_only_matryoshkas_loss():
    """Given prefix ends, topk and batchtopk keep the one FVU of the whole reconstruction; only
    matryoshka adds the shorter prefixes' FVUs (each computed here from the arch's codes)."""
    dead = torch.zeros(64, dtype=torch.bool)
    for arch in ('topk', 'batchtopk', 'matryoshka'):
        sae, x = make(arch=arch)
        sae.requires_grad_(False)
        z = sae_script.ARCHS[arch]['select'](sae.pre(x), sae)
        fvu = lambda z: ((x - z @ sae.W_dec - sae.b_dec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        prefixes = sae.ends if arch == 'matryoshka' else [64]
        want = sum(fvu(z * (torch.arange(64) < e)) for e in prefixes)
        torch.testing.assert_close(losses(sae, x, dead, 0, global_var(x))[0], want)

def test_theta_follows_its_running_mean():
    """theta starts at the smallest value the first step keeps (the k*B-th largest of relu(pre),
    computed densely here), then moves by theta_rate towards each step's, the mean over ranks
    (one here)."""
    sae, x = make(n=256, arch='batchtopk')
    opt, since = make_optimizer(sae, 1e-2), torch.zeros(256, dtype=torch.long)
    want = 0.0
    for step in range(6):
        with torch.no_grad():
            pre = sae.pre(x)
        low = pre.relu().flatten().topk(4 * len(x)).values[-1].item()
        want = low if step == 0 else want + 0.25 * (low - want)
        # the plain path computes pre as sae.pre does here (bit for bit): the same entry is the
        # cut on every machine (the fast path's theta is held to the plain one's above)
        train_step(sae, opt, x, since, 1e-2, {**CFG, 'theta_rate': 0.25, 'fast': False})
        assert abs(sae.theta.item() - want) < 1e-5 * want

@pytest.mark.parametrize('arch', ['topk', 'batchtopk', 'matryoshka'])
def test_saved_arch_round_trips_and_encodes_as_a_jumprelu(arch, tmp_path):
    """Each arch saves and loads to the same codes; the file records the arch, theta (divided by
    the input scale) and the prefix ends; batchtopk and matryoshka are SAELens's 'jumprelu', and
    its formula on the file's tensors, relu(pre) * (pre > threshold), gives our codes. With theta
    at a batch's k*B-th value, the JumpReLU keeps what the batch selection keeps, less that one
    entry (theta itself: the threshold is strict)."""
    sae, x = make(n=256, arch=arch)
    with torch.no_grad():
        train = batch_top_k(sae.pre(x), sae)
    sae.theta.fill_(train[train > 0].min())
    s, info = 0.37, {'model': 'm', 'layer': 3, 'hook': 'model.layers.3', 'ctx_len': 32,
                     'n_latents': 256}
    save_sae(sae, s, str(tmp_path), info)
    loaded, got = load_sae(str(tmp_path))
    assert (loaded.arch, loaded.ends, got['arch'], got['ends']) == (arch, sae.ends, arch, sae.ends)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(s * x) / s)
        torch.testing.assert_close(loaded(x), sae(s * x) / s, rtol=1e-4, atol=1e-5)
    cfg = json.load(open(tmp_path / 'cfg.json'))
    if arch == 'topk':
        assert (cfg['architecture'], cfg['k']) == ('topk', 4)
        return
    assert cfg['architecture'] == 'jumprelu' and 'k' not in cfg
    with safe_open(str(tmp_path / 'sae_weights.safetensors'), 'pt') as f:
        t = {name: f.get_tensor(name) for name in f.keys()}
        assert float(f.metadata()['theta']) == pytest.approx(sae.theta.item() / s)
    p = (x - t['b_dec']) @ t['W_enc'] + t['b_enc']
    saelens = p.relu() * (p > t['threshold'])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), saelens)
        # in the training space: the batch's selection, less the entry at theta
        jump = sae.encode(x)
    assert torch.equal(jump, train * (train > sae.theta))
    # dropped: the entries at theta (one, unless the batch has a tie there)
    assert (train > 0).sum() - (jump > 0).sum() == (train == sae.theta).sum() >= 1

# A forker's arch (README, "Fork it"): the 2023 baseline, ReLU + L1, added to sae.py's archs in
# these lines and nowhere else
RELU_L1 = """
# relu (Bricken et al. 2023, the baseline): every latent relu'd, in training and at inference, and
# an L1 penalty on the codes, so that few stay on (W_dec's rows are unit norm: no cheating by norm)
L1 = 0.05

def relu(pre, sae):
    return pre.relu()

def l1(sae, x, z):
    return L1 * z.sum() / len(x)

"""

def test_a_forker_adds_an_arch_in_one_place(tiny, tmp_path):
    """The three scripts copied to a folder, and a ReLU + L1 SAE added to that sae.py in one place
    (its functions and its entry in ARCHS, 12 lines): the copy trains it on the plain path, the
    FVU falls and the codes are sparse, it saves, and the copy's steer.py inspects a prompt with
    it and steers by one of its latents."""
    for f in ('capture.py', 'sae.py', 'steer.py'):
        shutil.copy(os.path.join(REPO, f), tmp_path / f)
    src = (tmp_path / 'sae.py').read_text()
    added = RELU_L1 + "    'relu': dict(select=relu, encode=relu, loss=l1),\n"
    assert src.count('ARCHS = {\n') == 1 and len(added.strip().splitlines()) <= 20
    src = src.replace('ARCHS = {\n', RELU_L1 + 'ARCHS = {\n' + added.splitlines()[-1] + '\n')
    (tmp_path / 'sae.py').write_text(src)
    out = tmp_path / 'relu'
    p = subprocess.run(command(tmp_path / 'sae.py', f'--data_dir={tiny["cap"]}', f'--out_dir={out}',
                               '--arch=relu', '--fast=False', '--n_latents=256', '--k=8',
                               '--batch_size=128', '--max_iters=300', '--log_interval=10'),
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and 'plain path' in p.stdout, p.stderr[-2000:]
    logged = [r for r in map(json.loads, open(out / 'metrics.jsonl')) if 'fvu' in r]
    ev = json.loads(safe_open(str(out / 'sae_weights.safetensors'), 'pt').metadata()['nanosae'])
    assert logged[-1]['fvu'] < 0.5 * logged[0]['fvu'] and ev['eval']['fvu'] < 0.5
    assert ev['arch'] == 'relu' and ev['eval']['l0'] < 256 / 8
    for extra in ([], ['--latent=3', '--max_new_tokens=4']):
        p = subprocess.run(command(tmp_path / 'steer.py', f'--sae_path={out}', '--prompt=the river',
                                   *extra), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    assert "' river'" in p.stdout or '--- steered ---' in p.stdout

# ------------------------------------------------ known features, and the README's speed command
def known_features(B, g, d=48, nf=96, parents=8):
    """Activations from a known dictionary with the structure that tells the archs apart: F unit
    directions in d < nf dimensions (so they overlap), Zipf-like firing rates (feature i fires with
    probability ~ 1 / (i + 1)^0.8), a varying number of active features per row, and parent/child
    pairs: each of the first `parents` features has two children, which fire only with it (one
    at most, half the time). Returns the activations (B, d), the true codes (B, nf), the
    dictionary and the children."""
    # the same dictionary for every batch; batch g's codes from seed g
    true = F.normalize(torch.randn(nf, d, generator=torch.Generator().manual_seed(0)), dim=1)
    gen = torch.Generator().manual_seed(g)
    rate = 0.5 / (torch.arange(nf) + 1.0) ** 0.8
    z = (torch.rand(B, nf, generator=gen) < rate).float()
    # children: features parents + 2j and parents + 2j + 1 belong to parent j
    child = torch.arange(parents, parents + 2 * parents).view(parents, 2)
    z[:, child.flatten()] = 0
    pick = torch.randint(0, 2, (B, parents), generator=gen)
    on = z[:, :parents].bool() & (torch.rand(B, parents, generator=gen) < 0.5)
    z.scatter_(1, child[torch.arange(parents), pick], on.float())
    z *= 0.5 + torch.rand(B, nf, generator=gen)
    return z @ true + 0.01 * torch.randn(B, d, generator=gen), z, true, child


def train_on_known(arch, steps=1200, seed=0):
    """An SAE of each arch, 2x the true features' count and k = the mean count of active ones
    (about 6), trained on fresh batches of known_features."""
    torch.manual_seed(seed)
    sae = SAE(48, 192, 6, arch, [24, 48, 96, 192] if arch == 'matryoshka' else ())
    opt, since = make_optimizer(sae, 3e-3), torch.zeros(192, dtype=torch.long)
    scale = init_from_data(sae, known_features(4096, 10**6)[0])
    for i in range(steps):
        lr = 3e-3 * min(1, (steps - i) / (steps // 5))
        train_step(sae, opt, known_features(512, i)[0] * scale, since, lr,
                   {**CFG, 'dead_tokens': 20_000, 'k_aux': 24})
    return sae, scale

def recovery(sae, scale, B=20000):
    """Against the truth, on fresh activations: the share of true features that some decoder row
    matches at cos >= 0.9; greedy one-to-one matching by cosine (highest first), its mean cosine
    (MCC); F1 of each matched latent's firing against its feature's (mean over all features,
    unmatched 0); absorption: of the rows where a parent and one of its children are active and
    the child's latent fires, the share where the parent's latent is silent."""
    x, z, true, child = known_features(B, 10**7)
    cos = true @ sae.W_dec.detach().T  # (F, n)
    out = {'recovery': (cos.max(1).values >= 0.9).float().mean().item()}
    match, c = {}, cos.clone()
    for _ in range(len(true)):
        f, j = divmod(int(c.argmax()), c.shape[1])
        match[f] = (j, cos[f, j].item())
        c[f], c[:, j] = -2, -2
    out['mcc'] = float(np.mean([m[1] for m in match.values()]))
    with torch.no_grad():
        fired = sae.encode(x * scale) > 0
    f1 = []
    for f, (j, _) in match.items():
        tp = (fired[:, j] & (z[:, f] > 0)).sum().item()
        f1.append(2 * tp / max(fired[:, j].sum().item() + (z[:, f] > 0).sum().item(), 1))
    out['f1'] = float(np.mean(f1))
    silent = both = 0
    for p, kids in enumerate(child.tolist()):
        for c_ in kids:
            rows = (z[:, p] > 0) & (z[:, c_] > 0) & fired[:, match[c_][0]]
            both += rows.sum().item()
            silent += (rows & ~fired[:, match[p][0]]).sum().item()
    out['absorption'] = silent / max(both, 1)
    return {key: round(v, 3) for key, v in out.items()}

# below the least each arch reached over initial seeds 0-9 (topk 0.844, batchtopk 0.885) or 0-3
# (matryoshka 0.5; its seed 0 gives 0.677): float rounding on another machine or thread count moves
# training as another seed does, so a floor at one seed's value would hold by chance
@pytest.mark.parametrize('arch,floor', [('topk', 0.8), ('batchtopk', 0.83), ('matryoshka', 0.4)])
def test_known_features_are_recovered(arch, floor):
    """Each arch finds most of a known dictionary (a decoder row at cos >= 0.9 for each true
    feature; a random decoder finds none), on data with overlapping directions, Zipf-like rates,
    varying counts and parent/child pairs."""
    assert recovery(*train_on_known(arch))['recovery'] >= floor

def known_features_table():
    """The README's table: python -c 'import test_sae; test_sae.known_features_table()'."""
    for arch in ('topk', 'batchtopk', 'matryoshka'):
        print(arch, recovery(*train_on_known(arch)))

def step_vs_matmul(d=576, n=9216, k=32, batch=4096, steps=20, plain_steps=3, acts='',
                   dtype='auto'):
    """The README's speed line: seconds per training step of each arch at the default shapes, on
    the fast path and on the plain one, the encoder's product in `dtype` ('auto': what --dtype=auto
    picks here), against one x @ W_enc in that dtype (the product no SAE step can skip); on random
    data, or on rows of a capture's acts.npy (scaled, sinks left out, as sae.py trains). Medians
    (these machines are shared) of `steps` fast steps, `plain_steps` plain ones:
    python -c 'import test_sae; print(test_sae.step_vs_matmul(acts="data/smollm2-l15/acts.npy"))'"""
    name = sae_script.pick_dtype(dtype, 'cpu')[0]
    dt = getattr(torch, name)
    x = torch.randn(batch, d)
    if acts:
        rows = np.random.default_rng(0).choice(len(np.load(acts, mmap_mode='r')), batch, False)
        x = read_rows(acts, np.sort(rows))
        x = x[x.norm(dim=1) <= 10 * x.norm(dim=1).median()]
        x *= math.sqrt(d / x.pow(2).sum(1).mean())

    # one step of each arch and path in turn, and the product: a machine that slows down for a
    # while slows all of them alike
    runs = {}
    for arch in sae_script.ARCHS:
        for path in ('fast', 'plain'):
            torch.manual_seed(0)
            sae = SAE(d, n, k, arch, [n // 32, n // 16, n // 8, n // 4, n])
            opt, since = make_optimizer(sae, 1e-4), torch.zeros(n, dtype=torch.long)
            cfg = {**CFG, 'dtype': name, 'fast': path == 'fast'}
            runs[f'{arch}_{path}'] = functools.partial(train_step, sae, opt, x, since, 1e-4, cfg)
    xd, W = x.to(dt), sae.W_enc.detach().contiguous().to(dt)
    runs['matmul'] = lambda: xd @ W
    ts = {key: [] for key in runs}
    for j in range(steps):
        for key, f in runs.items():
            if key.endswith('plain') and j >= plain_steps:
                continue
            t0 = time.perf_counter()
            f()
            ts[key].append(time.perf_counter() - t0)
    step = {key: float(np.median(t)) for key, t in ts.items()}
    mm = step.pop('matmul')
    return {**{f'{key}_s': round(s, 4) for key, s in step.items()}, 'matmul_s': round(mm, 4),
            **{f'{key}_over_matmul': round(s / mm, 2) for key, s in step.items()},
            'dtype': name, 'threads': torch.get_num_threads()}

def test_the_readme_speed_command_runs():
    """The README's speed command, on small shapes: every figure it quotes is there (speed
    itself is a benchmark, never a test)."""
    r = step_vs_matmul(d=32, n=2048, k=8, batch=512, steps=2, plain_steps=1)
    assert {f'{a}_{p}_over_matmul' for a in ('topk', 'batchtopk', 'matryoshka')
            for p in ('fast', 'plain')} <= set(r)

# ------------------------------------------- scaling out, resuming after a kill, one run a folder
def test_torchrun_gloo_equals_one_process(tiny, tmp_path):
    """2 gloo ranks with batch 64 each give the weights of one process with batch 128 (and the
    script itself asserts that both ranks end with identical weights)."""
    # float32: a bf16 product may round a row differently in a batch of 64 than in one of 128, and a
    # top-k on a near-tie then picks another latent
    args = [f'--data_dir={tiny["cap"]}', '--n_latents=256', '--k=8', '--max_iters=30',
            '--dead_tokens=1500', '--warmup_iters=5', '--arch=topk', '--dtype=float32']
    run('sae.py', *args, '--batch_size=128', f'--out_dir={tmp_path / "one"}')
    run('sae.py', *args, '--batch_size=64', f'--out_dir={tmp_path / "two"}', nproc=2)
    a, b = load_sae(str(tmp_path / 'one'))[0], load_sae(str(tmp_path / 'two'))[0]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)

def test_batchtopk_under_torchrun_selects_per_rank(tiny, tmp_path):
    """BatchTopK under 2 gloo ranks: each rank selects its k*B among its own 64 rows (as
    dictionary_learning and SAELens do), so the run is not one process's with batch 128; what
    holds is that both ranks end with the same weights and theta (the script asserts it), theta
    the mean of the ranks' smallest kept values, and an L0 at inference near k."""
    args = [f'--data_dir={tiny["cap"]}', '--n_latents=256', '--k=8', '--max_iters=60',
            '--dead_tokens=1500', '--warmup_iters=5', '--arch=batchtopk', '--batch_size=64',
            '--theta_rate=0.1']
    run('sae.py', *args, f'--out_dir={tmp_path / "two"}', nproc=2)
    sae, info = load_sae(str(tmp_path / 'two'))
    assert sae.arch == 'batchtopk' and sae.theta > 0 and 4 <= info['eval']['l0'] <= 16

def test_resume_after_kill_equals_uninterrupted(tiny, trained, tmp_path):
    """kill -9 after the first checkpoint, rerun: the same weights as a run never interrupted
    (same machine, same threads). A checkpoint cut short is one line with both ways out, and
    the checkpoint and the SAE stay."""
    args = ['sae.py', f'--data_dir={tiny["cap"]}', '--n_latents=512', '--k=8', '--batch_size=256',
            '--max_iters=200', '--ckpt_interval=20', '--dead_tokens=3000']
    run(*args, f'--out_dir={tmp_path / "a"}')
    p = subprocess.Popen(command(*args, f'--out_dir={tmp_path / "b"}'), cwd=REPO, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / 'b' / 'ckpt.pt').exists() and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / 'b' / 'sae_weights.safetensors').exists()  # really interrupted
    assert 'resuming from' in run(*args, f'--out_dir={tmp_path / "b"}').stdout
    a, b = load_sae(str(tmp_path / 'a'))[0], load_sae(str(tmp_path / 'b'))[0]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    os.truncate(tmp_path / 'a' / 'ckpt.pt', os.path.getsize(tmp_path / 'a' / 'ckpt.pt') // 2)
    cut = (tmp_path / 'a' / 'ckpt.pt').read_bytes()
    fails([*args, f'--out_dir={tmp_path / "a"}'],
          ('ckpt.pt is damaged', '--init_from=scratch', '--out_dir'))
    assert (tmp_path / 'a' / 'ckpt.pt').read_bytes() == cut
    assert (tmp_path / 'a' / 'sae_weights.safetensors').exists()

def test_two_runs_into_one_folder(tiny, tmp_path):
    """A second capture or training into a folder that a running one holds refuses at the start,
    naming the holder; the holder is paused (SIGSTOP) so it cannot finish first. After a kill -9
    the lock it held is gone and the next run goes ahead."""
    cap, out = tmp_path / 'cap', tmp_path / 'sae'
    jobs = {cap: ['capture.py', *tiny['cap_args'], f'--out_dir={cap}'],
            out: ['sae.py', f'--data_dir={tiny["cap"]}', f'--out_dir={out}', *SAE_ARGS,
                  '--max_iters=40']}
    for folder, args in jobs.items():
        first = subprocess.Popen(command(*args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL)
        while not (folder / 'lock').exists() or (folder / 'lock').read_text() != str(first.pid):
            assert first.poll() is None
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        before = sorted(os.listdir(folder))
        fails(args, f'is in use by process {first.pid}')
        assert sorted(os.listdir(folder)) == before
        first.send_signal(signal.SIGKILL)
        first.wait()
        run(*args)
    assert (cap / 'meta.json').exists() and (out / 'sae_weights.safetensors').exists()

def test_a_writing_steer_run_holds_the_sae_folder(tiny, trained, tmp_path):
    """A steer.py run that writes beside the SAE (the dashboard here) holds its folder: a second
    one refuses at the start, naming the holder (paused with SIGSTOP, so it cannot finish first),
    and writes nothing; a --prompt run only reads, and runs beside it."""
    sae = tmp_path / 'sae'
    shutil.copytree(trained, sae)
    args = ['steer.py', f'--sae_path={sae}', '--browse=True']
    first = subprocess.Popen(command(*args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL)
    try:
        while (sae / 'lock').read_text() != str(first.pid):
            assert first.poll() is None
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        before = {f: (sae / f).stat().st_mtime_ns for f in os.listdir(sae)}
        fails(args, f'is in use by process {first.pid}')
        assert '--- steered ---' in run('steer.py', f'--sae_path={sae}', '--prompt=the river',
                                        '--latent=3', '--max_new_tokens=4').stdout
        assert {f: (sae / f).stat().st_mtime_ns for f in os.listdir(sae)} == before
    finally:
        first.kill()
        first.wait()

# ---------------------------------------------- the model with the SAE in the loop: steer, evaluate
def test_steering_at_0_changes_nothing_and_reaches_generated_tokens(tiny, trained):
    """Strength 0 (or an identity hook) gives the clean logits bit for bit; clamping a latent to
    its own value changes nothing; the hook acts on tokens generated with the KV cache."""
    lm, sae = load_lm(tiny['model']), load_sae(trained)[0]
    block = blocks(lm)[1][1]
    ids = torch.tensor([tiny['tok'](tiny['docs'][1]).input_ids[:24]])
    clean = lm(ids).logits
    for fn in (steer_fn(sae, 5, 0.0, 'add'), lambda h: h):
        h = attach(block, fn)
        assert torch.equal(lm(ids).logits, clean)
        h.remove()
    assert torch.equal(lm(ids).logits, clean)
    x = run_to_layer(lm, block, ids)[0, 1:]
    z = sae.encode(x).detach()
    i, f = z[0].argmax().item(), z[0].max().item()
    torch.testing.assert_close(steer_fn(sae, i, f, 'clamp')(x[:1]), x[:1])
    # every seq_len-1 step of generate: the block's output moved by exactly 3 * d_i
    seen = []
    h1 = attach(block, lambda h: seen.append(h.clone()) or steer_fn(sae, i, 3.0, 'add')(h))
    h2 = block.register_forward_hook(lambda m, a, o: seen.append(capture.hidden(o)))
    lm.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    h1.remove()
    h2.remove()
    steps = [(seen[j], seen[j + 1]) for j in range(0, len(seen), 2) if seen[j].shape[1] == 1]
    assert len(steps) == 3
    assert all(torch.allclose(post - pre, 3.0 * sae.W_dec[i].detach()) for pre, post in steps)

def forward_ce(lm, ctxs, sae=None):
    """Next-token CE from position 1 on, by whole forwards in batches of 4, with the block-1 output
    from position 1 on replaced by the SAE's reconstruction (computed in float32) by a hook
    written here; without an SAE, the clean model's."""
    def splice(m, a, out):
        h = capture.hidden(out)
        h[:, 1:] = sae(h[:, 1:].reshape(-1, h.shape[-1]).float()).view_as(h[:, 1:]).to(h.dtype)
    handle = blocks(lm)[1][1].register_forward_hook(splice) if sae else None
    ce, count = 0, 0
    with torch.no_grad():
        for j in range(0, len(ctxs), 4):
            ids, mask = capture.pad(ctxs[j:j + 4], 'cpu')
            logp = F.log_softmax(lm(input_ids=ids, attention_mask=mask).logits[:, 1:-1].float(), -1)
            tgt = mask[:, 2:].bool()
            ce -= logp[tgt].gather(1, ids[:, 2:][tgt][:, None]).sum().item()
            count += tgt.sum().item()
    if handle:
        handle.remove()
    return ce / count

def test_loss_recovered(tiny, trained):
    """The SAE changes the output distribution (KL > 0) and closes most of the gap to
    zero-ablation, by its formula; the
    clean and spliced CEs are those of whole forwards computed here (HF's own, and with a splice
    hook written here)."""
    lm, sae = load_lm(tiny['model']), load_sae(trained)[0]
    ctxs = [np.array(tiny['tok'](d).input_ids[:32], np.int32) for d in tiny['docs'][:12]]
    r = evaluate_lm(lm, blocks(lm)[1][1], sae, ctxs, 1, 4, 'cpu')
    assert r['kl'] > 0
    assert r['ce_clean'] < r['ce_zero_ablated'] and r['ce_spliced'] < r['ce_zero_ablated']
    # not ce_clean < ce_spliced: on 12 short documents the SAE can land a hair on either side
    gap = r['ce_zero_ablated'] - r['ce_clean']
    want = 100 * (r['ce_zero_ablated'] - r['ce_spliced']) / gap
    assert abs(r['loss_recovered_pct'] - want) < 1e-6 and r['loss_recovered_pct'] > 90
    assert abs(forward_ce(lm, ctxs) - r['ce_clean']) < 1e-4
    assert abs(forward_ce(lm, ctxs, sae) - r['ce_spliced']) < 1e-4

def test_loss_recovered_in_bf16(tiny, trained):
    """The evaluation with the model in bf16 (steer.py's --dtype=auto where bf16 is native): the
    clean and spliced CEs are those of whole bf16 forwards computed here, to 1e-4 relative.
    Compared with the same
    computation, not with the float32 evaluation: how far bf16 lands from float32 depends on the
    model and the kernels (2.4% for the spliced CE of one tiny SAE here), so no bound on it holds
    on every machine."""
    lm, sae = load_lm(tiny['model']).to(torch.bfloat16), load_sae(trained)[0]
    ctxs = [np.array(tiny['tok'](d).input_ids[:32], np.int32) for d in tiny['docs'][:12]]
    r = evaluate_lm(lm, blocks(lm)[1][1], sae, ctxs, 1, 4, 'cpu')
    for want, got in ((forward_ce(lm, ctxs), r['ce_clean']),
                      (forward_ce(lm, ctxs, sae), r['ce_spliced'])):
        assert abs(want - got) < 1e-4 * want

def encoded_capture(sae, cap):
    """The capture through the SAE, computed here: (N, n) activations and the token of each row."""
    N = json.load(open(os.path.join(cap, 'meta.json')))['N']
    with torch.no_grad():
        z = sae.encode(read_rows(os.path.join(cap, 'acts.npy'), np.arange(N)))
    return z, np.load(os.path.join(cap, 'tokens.npy'))

@pytest.mark.parametrize('arch', ['batchtopk', 'matryoshka'])
def test_steer_works_with_every_arch(tiny, labelled, arch, tmp_path):
    """steer.py's evaluation, probes, dashboard, --prompt inspection and steering on a batchtopk
    and a matryoshka SAE, all through its own encode: eval.json has the L0 at inference (the
    capture encoded here, its codes counted), and the dashboard's card of a matryoshka latent
    names its group, the one whose latents (between the file's ends) hold it."""
    out = tmp_path / arch
    run('sae.py', f'--data_dir={labelled["cap"]}', f'--out_dir={out}', *SAE_ARGS, f'--arch={arch}')
    sae = load_sae(str(out))[0]
    # float32: the truth below encodes in float32
    run('steer.py', f'--sae_path={out}', f'--data={tiny["corpus"]}', '--eval_tokens=500',
        '--dtype=float32')
    ev = json.load(open(out / 'eval.json'))
    # at inference a JumpReLU: each row keeps the latents whose pre-activation is above theta
    # (checked row by row, sink rows aside), as many as that is: some rows above k, some below
    x = read_rows(os.path.join(labelled['cap'], 'acts.npy'), np.arange(len(encoded_capture(
        sae, labelled['cap'])[1])))
    with torch.no_grad():
        per_row = (sae.encode(x) > 0).sum(1)
        above = (((x - sae.b_dec) @ sae.W_enc + sae.b_enc) > sae.theta).sum(1)
    real = x.norm(dim=1) <= sae.max_norm
    assert torch.equal(per_row[real], above[real]) and (per_row[~real] == 0).all()
    assert per_row.min() < sae.k < per_row.max()
    # steer.py's L0 is that count's mean (encoded in chunks there, so within its rounding)
    assert abs(ev['l0_inference'] - per_row.float().mean().item()) <= 0.01
    assert ev['probe_classes'] == 3 and ev['ce_spliced'] < ev['ce_zero_ablated']
    # one line per token of the prompt (bytes here), and the last one
    assert len(run('steer.py', f'--sae_path={out}', '--prompt=the river').stdout.splitlines()) > 9
    p = run('steer.py', f'--sae_path={out}', '--prompt=the river', '--latent=3', '--mode=clamp')
    assert '--- steered ---' in p.stdout
    # the page, in Chromium (last: without it, only this part skips): a latent of the first group
    # and one of the last
    live = [c['i'] for c in json.load(open(out / 'browser.json'))['latents']]
    assert arch != 'matryoshka' or live[0] < sae.ends[0] and live[-1] >= sae.ends[-2]
    lo = [0] + sae.ends
    for i in (live[0], live[-1]):
        dom = chromium_dom(f"file://{out / 'browser.html'}#{i}", tmp_path)
        shown = re.findall(r'matryoshka group (\d+): latents (\d+)\.\.(\d+)<', dom)
        g = max(j for j in range(len(sae.ends)) if lo[j] <= i)
        assert shown == ([(str(g), str(lo[g]), str(sae.ends[g] - 1))] if arch == 'matryoshka'
                         else [])

# ----------------------------------------------------------------------------------- the dashboard
def test_dashboard_data_matches_the_capture(tiny, trained):
    """browser.json, for every live latent, against the capture encoded here: the nonzero count,
    the histogram's total, the top example's firing token and value (the row where the latent is
    largest), the top examples in falling order, the spread over the range in rising order. And the
    scan behind it against the dense codes: counts, the E largest values per latent, each one's
    row and window (ties among equal values may keep any of their rows: each kept row is
    checked, not which)."""
    run('steer.py', f'--sae_path={trained}', '--browse=True', '--n_examples=3', '--dtype=float32')
    sae = load_sae(trained)[0]
    z, tokens = encoded_capture(sae, tiny['cap'])
    data = json.load(open(os.path.join(trained, 'browser.json')))
    counts = (z > 0).sum(0)
    assert [l['i'] for l in data['latents']] == torch.nonzero(counts).flatten().tolist()
    assert data['dead'] == (counts == 0).sum()
    for l in data['latents']:
        i, (ids, acts, at, value) = l['i'], l['top'][0]
        assert l['count'] == counts[i] == sum(l['hist'][1]) and len(l['top']) == min(3, l['count'])
        assert data['vocab'][ids[at]] == tiny['tok'].decode([int(tokens[z[:, i].argmax()])])
        assert abs(value - z[:, i].max().item()) < 1e-3 and acts[at] == 10
        assert [ex[3] for ex in l['top']] == sorted([ex[3] for ex in l['top']], reverse=True)
        q = [ex[3] for ex in l['spread']]
        assert q == sorted(q) and len(q) == min(10, l['count'])
    codes = steer.encode_all(sae, os.path.join(tiny['cap'], 'acts.npy'))
    a = steer.read_capture(tiny['cap'])
    count, hist, (top, _) = steer.scan(codes, 256, 3, 10)
    assert torch.equal(count, (z > 0).sum(0)) and torch.equal(hist.sum(1), count)
    want = z.topk(3, dim=0).values.T
    for i in range(256):
        rows = torch.from_numpy(codes.row[top[i].numpy()]).long()
        assert torch.equal(z[rows, i], want[i][want[i] > 0])
        assert (codes.lat[top[i].numpy()] == i).all()
        # each example's window: the rows around it in its context (token ids through the page's
        # table), with the latent on each in tenths of its largest value
        big, vocab = z[:, i].max().item(), {}
        for c in top[i].tolist():
            ids, acts, at, value = steer.page_example(c, i, codes, a, big, vocab)
            r = int(codes.row[c])
            win = [s for s in range(r - 8, r + 4)
                   if 0 <= s < len(z) and a['ctx'][s] == a['ctx'][r]]
            assert acts[-len(win):] == [round(10 * v / big) for v in z[win, i].tolist()]
            assert value == round(z[r, i].item(), 3) and list(vocab)[ids[at]] == tokens[r]
            assert len(acts) == len(win) + (a['pos'][win[0]] == 1)

def chromium_dom(url, tmp_path):
    """The DOM after the page's script has run, from Debian's chromium, headless."""
    exe = shutil.which('chromium')
    if exe is None:
        pytest.skip('no chromium on this machine: `apt-get install chromium` (.ci/run does)')
    flags = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-sync',
             '--disable-background-networking', '--disable-component-update', '--disable-quic',
             f'--user-data-dir={tmp_path / "chromium"}', '--virtual-time-budget=10000']
    p = subprocess.run([exe, *flags, '--dump-dom', url], capture_output=True, text=True,
                       timeout=120)
    assert '</html>' in p.stdout or '</body>' in p.stdout, p.stderr[-2000:]
    return p.stdout

def test_dashboard_in_a_real_browser(tiny, trained, tmp_path):
    """The page as Chromium renders it, against the capture encoded here: every live latent is
    in the list; #N shows latent N's card, whose top example marks the token and value of the row
    where N is largest and whose histogram bars add up to N's nonzero activations; ?sort=density
    puts the densest latent first."""
    run('steer.py', f'--sae_path={trained}', '--browse=True', '--dtype=float32')
    z, tokens = encoded_capture(load_sae(trained)[0], tiny['cap'])
    counts = (z > 0).sum(0)
    page = 'file://' + os.path.join(trained, 'browser.html')
    links = [int(i) for i in re.findall(r'<li><a href="#(\d+)">', chromium_dom(page, tmp_path))]
    assert sorted(links) == torch.nonzero(counts).flatten().tolist()
    # a latent of middling density, not the first of the list
    i = int(torch.nonzero(counts).flatten()[len(links) // 2])
    dom = chromium_dom(f'{page}#{i}', tmp_path)
    card = dom[dom.index('id="card"'):]
    assert f'<h2 data-latent="{i}">latent {i}</h2>' in card
    act, text = re.search(r'class="peak" data-act="([^"]+)">([^<]*)</span>', card).groups()
    assert html.unescape(text) == tiny['tok'].decode([int(tokens[z[:, i].argmax()])])
    assert abs(float(act) - z[:, i].max().item()) < 1e-3
    hist = card[:card.index('top activations')]
    assert sum(int(c) for c in re.findall(r'data-count="(\d+)"', hist)) == counts[i]
    first = re.search(r'<li><a href="#(\d+)">', chromium_dom(f'{page}?sort=density', tmp_path))
    assert counts[int(first.group(1))] == counts.max()

# ------------------------------------------------------------- the real default model, end to end
def test_real_default_pipeline(tmp_path):
    """The offline default: SmolLM2-135M-Instruct (GGUF) on the Wikipedia corpus, a few thousand
    tokens; the clean CE of a real model on real text is between 1 and 5 nats."""
    cap, out = tmp_path / 'cap', tmp_path / 'sae'
    runs = [run('capture.py', '--max_tokens=3000', f'--out_dir={cap}', alone=True),
            run('sae.py', f'--data_dir={cap}', f'--out_dir={out}', '--batch_size=256',
                '--max_iters=40', '--expansion=4', alone=True),
            run('steer.py', f'--sae_path={out}', '--eval_tokens=300', '--browse_latents=10',
                alone=True)]
    # no progress bar (the GGUF de-quantization draws one) between a user and a one-line message
    assert not any('it/s]' in p.stderr for p in runs)
    ev = json.load(open(out / 'eval.json'))
    assert 1 < ev['ce_clean'] < 5
    assert ev['ce_spliced'] < ev['ce_zero_ablated']
    assert (out / 'browser.html').exists() and 'loss_recovered_pct' in runs[-1].stdout

# --------------------------------------- interpret: sparse probes, explanations scored by detection
def test_k_sparse_probe_finds_a_planted_latent():
    """Planted: latent 7 fires only on class 0's documents; the class signal in the residual
    stream is spread evenly over all 32 dimensions, so no one dimension carries it. The top-1
    SAE probe finds latent 7 and is near 1.0 on held-out documents; the top-1 residual probe is
    near chance, and the full residual probe (all dimensions) recovers the class."""
    g = torch.Generator().manual_seed(0)
    D, n, d = 600, 50, 32
    label = torch.arange(D) % 3
    lat = torch.rand(D, n, generator=g) * (torch.rand(D, n, generator=g) < 0.2)
    lat[:, 7] = (label == 0) * (1 + torch.rand(D, generator=g))
    res = torch.randn(D, d, generator=g) + 3 * (label == 0)[:, None] * torch.ones(d) / d ** 0.5
    r = steer.sparse_probe(lat, res, label, torch.arange(D) % 5 == 0, ['a', 'b', 'c'])
    assert r['probe_best_latent']['a'] == {'latent': 7, 'accuracy': 1.0}
    # class 0's top-1 scores, through the mean over the 3 classes (b and c are near chance)
    assert r['probe_sae_top1'] > r['probe_residual_top1'] + 0.1
    assert r['probe_residual_full'] > r['probe_residual_top1']

def test_probe_end_to_end_and_eval_json_keeps_every_stage(labelled, tiny):
    """`--probe=True` writes its numbers into eval.json beside the evaluation's, and a later
    evaluation keeps them. With the dashboard in the same run (as by default), both read the same
    codes: the same live latents as the capture encoded here."""
    path, ev_args = os.path.join(labelled['sae'], 'eval.json'), [f'--data={tiny["corpus"]}',
                                                                   '--eval_tokens=300']
    run('steer.py', f'--sae_path={labelled["sae"]}', '--evaluate=True', *ev_args)
    out = run('steer.py', f'--sae_path={labelled["sae"]}', '--probe=True', '--browse=True',
              '--dtype=float32').stdout
    ev = json.load(open(path))
    assert ev['probe_classes'] == 3 and 'ce_clean' in ev and 'probe_sae_top5' in out
    run('steer.py', f'--sae_path={labelled["sae"]}', '--evaluate=True', *ev_args)
    assert json.load(open(path))['probe_best_latent'] == ev['probe_best_latent']
    z, _ = encoded_capture(load_sae(labelled['sae'])[0], labelled['cap'])
    data = json.load(open(os.path.join(labelled['sae'], 'browser.json')))
    assert [l['i'] for l in data['latents']] == torch.nonzero((z > 0).sum(0)).flatten().tolist()
    assert set(ev['probe_best_latent']) == {'topic0', 'topic1', 'topic2'}

def planted(labelled, tmp_path):
    """The labelled capture with its activations replaced: row r is 5 * E[token r], E a random
    unit vector per token; an SAE with k = 1 whose latent t reads and writes E[t]. Latent t then
    fires exactly on token t, and nowhere else."""
    cap = tmp_path / 'planted'
    shutil.copytree(labelled['cap'], cap)
    tokens = np.load(cap / 'tokens.npy')
    V = int(tokens.max()) + 1
    E = F.normalize(torch.randn(V, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    acts = np.load(cap / 'acts.npy', mmap_mode='r+')
    acts[:] = 5 * E[tokens].numpy()
    acts.flush()
    sae = SAE(64, V, 1)
    with torch.no_grad():
        sae.W_dec.copy_(E)
        sae.W_enc.copy_(E.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    meta = json.load(open(cap / 'meta.json'))
    return sae, {'data_dir': str(cap), 'model': meta['model'], 'hook': meta['hook']}

def test_detection_score_against_a_planted_token_latent(tiny, labelled, tmp_path):
    """Latent t fires exactly on token t. With a scorer that follows the explanation (it says
    yes when the text holds the token named), an explanation naming t scores 1.0: the LLM's here
    (a stand-in that names the most marked token) and the token baseline; another latent's
    explanation scores about 0.5. No held-out snippet is in the explainer's input: their
    documents are disjoint, and those of the score set are all held out."""
    sae, info = planted(labelled, tmp_path)
    tok, cap = tiny['tok'], info['data_dir']
    codes, a, meta = steer.encode_all(sae, f'{cap}/acts.npy'), steer.read_capture(cap), \
        check_capture(cap)
    # one code per row, on the row's token
    assert (codes.lat == a['tokens']).all()
    assert (codes.row == np.arange(len(a['tokens']))).all()

    def chat(messages, max_tokens):
        marked = Counter(re.findall(r'<<(.+?)>>', messages[-1]['content']))
        return f"the token '{marked.most_common(1)[0][0]}'"

    def judge(explanation, texts):
        word = re.search(r"'(.+?)'", explanation).group(1)
        return [float(word in t) for t in texts]
    k, o = tok.convert_tokens_to_ids(['k', 'o'])
    r = steer.interpret(sae, meta, a, codes, tok, (chat, judge, False, 1), [k, o], 0)
    s = r['latents'][str(k)]
    assert s['explanation'] == s['token_baseline'] == "the token 'k'"
    assert s['scores']['llm']['balanced_accuracy'] == 1.0
    assert s['scores']['token']['balanced_accuracy'] == 1.0
    assert s['positives'] == min(20, s['contexts']['score']) and s['negatives'] == 20
    assert 'auroc_topic' not in s['scores']['llm']  # 0/1 answers: balanced accuracy only
    assert s['random_from'] == o and 0.3 <= s['scores']['random']['balanced_accuracy'] <= 0.7
    e = steer.explainer_texts(k, codes, a, tok, np.random.default_rng(0), meta['labels'])
    shown, scored = a['row_doc'][e['about']['explain_rows']], a['row_doc'][e['about']['score_rows']]
    assert not set(shown) & set(scored) and steer.is_test(scored).all()
    assert not steer.is_test(shown).any()
    # the negatives: 10 of the latent's topic (truth 0), then 10 random ones (-1)
    assert e['truth'][-20:] == [0] * 10 + [-1] * 10
    topics = a['row_label'][e['about']['score_rows'][-20:-10]]
    assert (topics == meta['labels'].index(e['about']['topic'])).all()

def test_a_prior_for_yes_does_not_hide_a_good_explanation(tiny, labelled, tmp_path):
    """A scripted scorer like the 1.5B model of the report: P(yes) is 0.75 on every text, plus
    0.03 where the text holds the token the explanation names. A cut at P(yes) = 0.5 calls every
    text 'yes' (balanced accuracy 0.5 for all three kinds); the AUROC, and balanced accuracy cut at
    the median P(yes), give the planted explanation 1.0 and the random control about 0.5."""
    sae, info = planted(labelled, tmp_path)
    tok, cap = tiny['tok'], info['data_dir']
    codes, a, meta = steer.encode_all(sae, f'{cap}/acts.npy'), steer.read_capture(cap), \
        check_capture(cap)

    def chat(messages, max_tokens):
        marked = Counter(re.findall(r'<<(.+?)>>', messages[-1]['content']))
        return f"the token '{marked.most_common(1)[0][0]}'"

    def judge(explanation, texts):
        word = re.search(r"'(.+?)'", explanation).group(1)
        return [0.75 + 0.03 * (word in t) for t in texts]
    k, o = tok.convert_tokens_to_ids(['k', 'o'])
    r = steer.interpret(sae, meta, a, codes, tok, (chat, judge, True, 1), [k, o], 0)
    s = r['latents'][str(k)]['scores']
    assert s['llm']['auroc'] == s['token']['auroc'] == 1.0 and 0.3 <= s['random']['auroc'] <= 0.7
    assert s['llm']['balanced_accuracy'] == 1.0 and 0.3 <= s['random']['balanced_accuracy'] <= 0.7
    assert 'auroc' in r['headline'] and 'median' in r['headline']
    # a broad explanation: texts of the latent's topic score as high as its positives, random
    # ones lower; the AUROC against each kind of negative says so (by hand: 2 of 4 pairs, 4 of 4)
    d = steer.detection([0.9, 0.8, 0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0, -1, -1], True)
    assert (d['auroc'], d['auroc_topic'], d['auroc_random']) == (0.75, 0.5, 1.0)
    # the old score, a cut at 0.5, calls every text 'yes': chance, for the planted explanation too
    e = steer.explainer_texts(k, codes, a, tok, np.random.default_rng([0, k]), meta['labels'])
    assert steer.detection(judge("the token 'k'", e['texts']), e['truth'], False) == \
        {'balanced_accuracy': 0.5, 'failed': 0}

def test_an_answer_that_repeats_the_prompt_or_copies_a_text_is_no_explanation(tiny, labelled,
                                                                             tmp_path):
    """The explainer's conversation puts the system's task first, worked examples next, the
    latent's snippets and then the question last. An answer that copies a snippet, or repeats
    the instructions, gets one reminder; a second such answer is a failed explanation: counted,
    never scored. A short answer that uses a snippet's word is an explanation."""
    msgs = steer.explain_messages('1. the <<sea>> is deep')
    assert msgs[0]['role'] == 'system' and [m['role'] for m in msgs[-3:]] == \
        ['user', 'assistant', 'user']
    last = msgs[-1]['content']
    assert last.index('<<sea>>') < last.index('What do the marked tokens have in common?')
    sae, info = planted(labelled, tmp_path)
    tok, cap = tiny['tok'], info['data_dir']
    codes, a, meta = steer.encode_all(sae, f'{cap}/acts.npy'), steer.read_capture(cap), \
        check_capture(cap)
    k, o, e = tok.convert_tokens_to_ids(['k', 'o', 'e'])

    # latent k copies a snippet, then repeats the instructions; o repeats them once, then answers
    def chat(messages, max_tokens):
        snippets, first = messages[5]['content'], len(messages) == 6
        copy = re.search(r'^1\. (.*)$', snippets, re.M).group(1).replace('<<', '').replace('>>', '')
        if '<<k>>' in snippets:
            return copy if first else 'You reply with a short phrase of 2 to 8 words'
        if '<<o>>' in snippets:
            return 'What do the marked tokens have in common' if first else 'the letter o'
        return 'the letter e'

    def judge(explanation, texts):
        return [0.5] * len(texts)
    r = steer.interpret(sae, meta, a, codes, tok, (chat, judge, True, 1), [k, o, e], 0)
    assert r['latents'][str(k)]['explanation'] is None and r['failed_explanations'] == 1
    assert 'llm' not in r['latents'][str(k)]['scores'] and r['summary']['llm']['latents'] == 2
    assert r['latents'][str(o)]['explanation'] == 'the letter o'
    assert steer.explanation('death', '1. the conflict\'s <<death>> toll') == 'death'
    assert steer.explanation('The sea or the ocean.', '1. the <<sea>>') == ''

# The prompts' hash for each PROMPT_VERSION: a prompt changed without a new version (whose cached
# answers would be taken for the new prompt's) fails here
PROMPTS = {2: 'c20a396b951cae72'}

def test_a_prompt_change_bumps_the_prompt_version():
    """The hash of every prompt text is the one recorded for steer.PROMPT_VERSION."""
    import hashlib
    texts = [steer.EXPLAIN_SYSTEM, steer.EXPLAIN_ASK, steer.EXPLAIN_EXAMPLES, steer.EXPLAIN_AGAIN,
             steer.DETECT_ONE, steer.DETECT_MANY]
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    assert PROMPTS.get(steer.PROMPT_VERSION) == digest, digest

class Endpoint(BaseHTTPRequestHandler):
    """A chat-completions server that follows the explanation: an explain request gets "the token
    'X'" (X marked most often), a detection request a list saying whether each text holds X.
    `fail` holds status codes to answer first (`failed` gets those requests); a request numbered
    `hold` waits for `gate`."""
    log, auth, fail, failed, hold, gate = [], [], [], [], 0, threading.Event()

    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        cls = type(self)
        cls.log.append(body)
        cls.auth.append(self.headers.get('Authorization'))
        if len(cls.log) == cls.hold:
            cls.gate.wait()
            return
        if cls.fail:
            cls.failed.append(body)
            self.send_response(cls.fail.pop(0))
            self.send_header('Retry-After', '0')
            self.end_headers()
            return
        text = json.loads(body)['messages'][-1]['content']
        if '<<' in text:
            answer = f"the token '{Counter(re.findall(r'<<(.+?)>>', text)).most_common(1)[0][0]}'"
        else:
            word = re.search(r"described as \".*?'(.+?)'", text).group(1)
            texts = re.findall(r'^\d+\. "(.*)"$', text, re.M)
            answer = json.dumps([int(word in t) for t in texts])
        out = json.dumps({'choices': [{'message': {'role': 'assistant', 'content': answer}}]})
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *args):
        pass

@pytest.fixture
def endpoint(tiny, labelled, tmp_path):
    """The server on a free port, and the steer.py command that explains latents 'k' and 'o' of
    the planted SAE (saved) through it."""
    Endpoint.log, Endpoint.auth, Endpoint.fail, Endpoint.failed, Endpoint.hold = [], [], [], [], 0
    Endpoint.gate = threading.Event()
    server = ThreadingHTTPServer(('127.0.0.1', 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}/v1'
    model, info = planted(labelled, tmp_path)
    sae = tmp_path / 'sae'
    save_sae(model, 1.0, str(sae), {**load_sae(labelled['sae'])[1], **info, 'k': 1,
                                    'n_latents': model.W_dec.shape[0]})
    k, o = tiny['tok'].convert_tokens_to_ids(['k', 'o'])
    yield {'sae': sae, 'url': url, 'k': k, 'args': [
        'steer.py', f'--sae_path={sae}', f'--explainer={url}', '--explainer_model=m',
        f'--latents={k},{o}', '--requests_in_flight=1', '--api_key_env=NANOSAE_TEST_KEY']}
    Endpoint.gate.set()
    server.shutdown()

def test_endpoint_key(endpoint):
    """The key goes in the Authorization header only when its variable is set; a 401 is one line
    naming the variable."""
    Endpoint.fail = [401]
    err = fails(endpoint['args'], 'HTTP 401')
    assert 'NANOSAE_TEST_KEY (it is not set)' in err and set(Endpoint.auth) == {None}
    n = len(Endpoint.auth)
    run(*endpoint['args'], env={**ENV, 'NANOSAE_TEST_KEY': 'k1'})
    assert set(Endpoint.auth[n:]) == {'Bearer k1'}

def test_endpoint_resume_sends_no_answered_request_twice(endpoint):
    """Killed while the server holds request 10, then run again with a 429 on its way: the run
    ends whole, and each request arrives once, plus once where it was held (never answered) and
    once where it got the 429 (counted at the server); one cached answer per answered request.
    The explanations it writes and the token baselines score 1.0, as the planted truth says."""
    Endpoint.hold = 10
    p = subprocess.Popen(command(*endpoint['args']), cwd=REPO, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(Endpoint.log) < 10 and time.time() < deadline:
        time.sleep(0.2)
    p.kill()
    p.wait()
    Endpoint.gate.set()
    Endpoint.fail = [429]
    run(*endpoint['args'], '--requests_in_flight=2')
    sent = Counter(Endpoint.log)
    assert len(Endpoint.failed) == 1 and len(sent) > 10
    for body, n in sent.items():
        assert n == 1 + (body == Endpoint.log[9]) + Endpoint.failed.count(body)
    assert len(open(endpoint['sae'] / 'cache.jsonl').readlines()) == len(sent)
    r = json.load(open(endpoint['sae'] / 'interp.json'))
    assert r['summary']['token']['mean'] == r['summary']['llm']['mean'] == 1.0
    assert r['summary']['llm']['failed_answers'] == 0 and r['explainer'] == endpoint['url']

def test_endpoint_rerun_is_free_and_the_dashboard_shows_it(endpoint, tmp_path):
    """A rerun asks the server nothing and writes the same interp.json; the dashboard then shows
    each explanation and its score, in browser.json and on the card as Chromium renders it."""
    run(*endpoint['args'])
    n, r = len(Endpoint.log), json.load(open(endpoint['sae'] / 'interp.json'))
    run(*endpoint['args'])
    assert len(Endpoint.log) == n
    assert json.load(open(endpoint['sae'] / 'interp.json'))['latents'] == r['latents']
    run('steer.py', f'--sae_path={endpoint["sae"]}', '--browse=True')
    assert json.load(open(endpoint['sae'] / 'browser.json'))['interp'] == \
        json.load(open(endpoint['sae'] / 'interp.json'))
    if shutil.which('chromium'):
        page = f'file://{endpoint["sae"] / "browser.html"}?sort=score#{endpoint["k"]}'
        dom = chromium_dom(page, tmp_path)
        assert html.unescape(re.search(r'class="expl">([^<]*)<', dom).group(1)) == "the token 'k'"
        assert re.search(r'class="score">([^<]*)<', dom).group(1) == '1'

def test_the_batched_judge_equals_each_prompt_alone(tiny, chat_model, tmp_path):
    """P(yes) from the judge (the prompts right-padded in one batch, the logits from the shortest
    one's last token on) equals P(yes) from each whole prompt run alone, with no padding; asked
    again, the judge answers from the cache without the model."""
    from transformers import AutoTokenizer
    lm, tok = load_lm(chat_model), AutoTokenizer.from_pretrained(chat_model)
    cache, log = {}, open(tmp_path / 'cache.jsonl', 'a')
    chat, judge = steer.local_backend('chat', lm, tok, cache, log, 3)
    texts = tiny['docs'][:7]
    got = judge('the word river', texts)
    yes, no = tok.convert_tokens_to_ids(['yes', 'no'])
    for t, p in zip(texts, got):
        text = steer.DETECT_ONE.format(explanation='the word river', text=t)
        ids = tok.apply_chat_template([{'role': 'user', 'content': text}], return_tensors='pt',
                                      add_generation_prompt=True, return_dict=True)['input_ids']
        lp = lm(ids).logits[0, -1].log_softmax(-1)
        assert abs(p - torch.sigmoid(lp[yes] - lp[no]).item()) < 1e-5
    assert len(cache) == 7
    lm.forward = None  # any call of the model now fails
    assert judge('the word river', texts) == got

def test_explain_with_a_local_model_and_a_gguf_file(tiny, labelled, chat_model, tmp_path,
                                                     monkeypatch):
    """The local path end to end, from an HF folder and from a GGUF file of the same model
    (written here with gguf's writer): the GGUF loads with the HF model's logits, and both give
    the same P(yes) per text, so an AUROC per latent and the same interp.json scores; a rerun is
    exact and asks the model nothing (the cache). The GGUF file de-quantized into a folder, as the
    default model is, gives the same logits bit for bit."""
    from transformers import AutoTokenizer
    gguf_file = tmp_path / 'chat.gguf'
    write_gguf(load_lm(chat_model), AutoTokenizer.from_pretrained(chat_model), str(gguf_file),
               TEMPLATE)
    ids = torch.tensor([tiny['tok'](tiny['docs'][0]).input_ids])
    logits = capture.load_model(str(gguf_file))[0](ids).logits
    torch.testing.assert_close(logits, load_lm(chat_model)(ids).logits)
    # de-quantized once into a folder (as the default model is) with the GGUF model's very logits;
    # asked again, the folder is there and nothing is loaded
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    folder = capture.dequantized(str(gguf_file))
    assert torch.equal(load_lm(folder)(ids).logits, logits) and tmp_path in Path(folder).parents
    monkeypatch.setattr(capture, 'load_model', None)
    assert capture.dequantized(str(gguf_file)) == folder
    assert os.listdir(tmp_path / 'cache' / 'nanosae') == [os.path.basename(folder)]
    monkeypatch.undo()
    # where no folder can be written (the cache's place is a file), the GGUF file itself serves
    monkeypatch.setenv('XDG_CACHE_HOME', str(gguf_file))
    assert capture.dequantized(str(gguf_file)) == str(gguf_file)
    monkeypatch.undo()
    got = {}
    for explainer in (chat_model, str(gguf_file)):
        sae = tmp_path / f'sae-{explainer == chat_model}'
        shutil.copytree(labelled['sae'], sae)
        args = ['steer.py', f'--sae_path={sae}', f'--explainer={explainer}', '--explain=2']
        run(*args)
        r = json.load(open(sae / 'interp.json'))
        assert len(r['latents']) == 2 and r['explainer'] == explainer
        # the tiny model's answers may fail the explanation check: then only the controls score
        for e in r['latents'].values():
            assert 'auroc' in e['scores']['token'] and e['positives'] > 0
            assert (e['explanation'] is None) == ('llm' not in e['scores'])
        lines = open(sae / 'cache.jsonl').readlines()
        run(*args)
        assert open(sae / 'cache.jsonl').readlines() == lines
        assert json.load(open(sae / 'interp.json'))['latents'] == r['latents']
        got[explainer] = {i: e['scores'] for i, e in r['latents'].items()}
    assert got[chat_model] == got[str(gguf_file)]

# --------------------------------------------------------------------------- verify by steering
@pytest.fixture(scope='session')
def steerable(tiny, tmp_path_factory):
    """A hand-set 2-block Llama whose blocks add nothing (their output projections are zero): the
    residual stream at every block is the token's embedding 5 E[t] (E random unit rows), and the
    unembedding is E again, so the model predicts its last token again, and adding c E[t] at a
    block with c > 5 makes t the likeliest next token. Its capture of the tiny corpus (by
    capture.py), and an SAE (topk, k = 1) whose latent t reads and writes E[t]: latent t fires on
    token t alone. The SAE's file gives the residual's median norm (the strength unit) as 40, so
    that the weakest push (0.5 x 40 = 20) writes the latent's token; a copy ('weak') says 1e-6."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root, tok = tmp_path_factory.mktemp('steerable'), tiny['tok']
    E = F.normalize(torch.randn(len(tok), 64, generator=torch.Generator().manual_seed(0)), dim=1)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=False))
    with torch.no_grad():
        for b in lm.model.layers:
            b.self_attn.o_proj.weight.zero_()
            b.mlp.down_proj.weight.zero_()
        lm.model.embed_tokens.weight.copy_(5 * E)
        lm.lm_head.weight.copy_(E)
    lm.save_pretrained(root / 'model')
    tok.save_pretrained(root / 'model')
    args = [a for a in tiny['cap_args'] if not a.startswith('--model=')]
    run('capture.py', *args, f'--model={root / "model"}', f'--out_dir={root / "cap"}')
    meta = check_capture(root / 'cap')
    sae = SAE(64, len(tok), 1)
    with torch.no_grad():
        sae.W_dec.copy_(E)
        sae.W_enc.copy_(E.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    info = {'model': str(root / 'model'), 'layer': 1, 'hook': meta['hook'], 'ctx_len': 32,
            'n_latents': len(tok), 'data_dir': str(root / 'cap'), 'capture': meta, 'config': {}}
    save_sae(sae, 1.0, str(root / 'sae'), {**info, 'median_norm': 40.0})
    save_sae(sae, 1.0, str(root / 'weak'), {**info, 'median_norm': 1e-6})
    k = tok.convert_tokens_to_ids('k')
    return {'sae': root / 'sae', 'weak': root / 'weak', 'lm': lm, 'E': E, 'k': k, 'args': [
        'steer.py', f'--data={tiny["corpus"]}', '--dtype=float32', '--verify=1', f'--latents={k}']}

def continue_by_hand(lm, E, x, push, p, seed=1337, n=24, temperature=0.7):
    """Prompt p of steer.PROMPTS (ids x) continued by the hand-set model, written out: its blocks
    add nothing, so the next token's logits are the unembedding of the final norm of 5 E[last
    token] + push; sampled by Gumbel-max with the noise of row p of a (PROMPTS, vocab) draw seeded
    with seed + the length so far. Returns the n new tokens."""
    x = list(x)
    with torch.no_grad():
        for _ in range(n):
            logits = lm.lm_head(lm.model.norm(5 * E[x[-1]] + push))
            g = torch.Generator().manual_seed(seed + len(x))
            u = torch.rand(steer.PROMPTS, len(E), generator=g)[p].clamp_min(1e-20)
            x.append(int((logits / temperature - (-u.log()).log()).argmax()))
    return x[-n:]

def test_steering_a_latent_makes_the_model_write_what_it_detects(steerable, tmp_path):
    """Pushing latent 'k' of the hand-set model: at every strength the model writes 'k'
    (re-detection near 1; a random direction's near 0), and k's rise ranks first of all n
    latents: p = 1 / n, verified, and no random direction in its place verifies (false rate
    0). The strength is the strongest within the KL budget (else the weakest),
    the first token's KL as written out here; what rose: latent k (its top token 'k') and the token
    'k'. Every prompt's continuation, unsteered and at each strength, is a sampling loop written
    out by hand (same noise, the push from position 1 on, no KV cache): the re-detection and the
    samples agree with it. The dashboard shows the verdict, and sorting by p puts 'k' first."""
    sae, k, lm, E = tmp_path / 'sae', steerable['k'], steerable['lm'], steerable['E']
    shutil.copytree(steerable['sae'], sae)
    run(*steerable['args'], f'--sae_path={sae}', '--browse=True')
    v = json.load(open(sae / 'verify.json'))
    r, n, S = v['latents'][str(k)], len(E), v['settings']['strengths']
    assert S == steer.STRENGTHS and min(r['redetect']) > 0.9 and max(r['redetect_random']) < 0.1
    assert r['rank'] == [1, 1] and r['p'] == 1 / n and r['verified'] and r['false_rate'] == 0
    assert v['summary'] == {'latents': 1, 'verified': 1, 'share_95': steer.wilson(1, 1),
                            'false_rate': 0.0, 'false_rate_95': steer.wilson(0, steer.CALIBRATION),
                            'median_rank': 1.0}
    assert r['strength'] == max([j for j, kl in enumerate(r['kl']) if kl <= steer.KL_BUDGET],
                                default=0)
    assert r['rose'][0][0] == k and r['rose'][0][2] == ['k'] and r['tokens'][0][0] == 'k'
    tok = byte_tokenizer()
    prompts = [tok(p).input_ids for p in v['settings']['prompts']]
    with torch.no_grad():
        first = [lm.lm_head(lm.model.norm(5 * E[x[-1]])).log_softmax(-1) for x in prompts]
        for j, s in enumerate([0.0, *S]):
            push = s * 40 * E[k]
            texts = [continue_by_hand(lm, E, x, push, p) for p, x in enumerate(prompts)]
            assert tok.batch_decode(texts[:3]) == r['samples'][j]
            if j:
                assert np.isclose(np.mean([t == k for t in sum(texts, [])]), r['redetect'][j - 1])
                logp = [lm.lm_head(lm.model.norm(5 * E[x[-1]] + push)).log_softmax(-1)
                        for x in prompts]
                kl = np.mean([(a.exp() * (a - b)).sum().item() for a, b in zip(logp, first)])
                assert np.isclose(kl, r['kl'][j - 1], rtol=1e-4)
    assert json.load(open(sae / 'browser.json'))['verify'] == v
    # the page, in Chromium (last: without it, only this part skips)
    page = f"file://{sae / 'browser.html'}"
    dom = chromium_dom(f'{page}#{k}', tmp_path)
    assert re.search(r'class="verdict">steering: verified<', dom) and 'class="samples"' in dom
    assert re.search(r'rose most: <a href="#\d+">', dom)
    first = re.search(r'<li><a href="#(\d+)">', chromium_dom(f'{page}?sort=p', tmp_path))
    assert int(first.group(1)) == k

def test_a_push_that_changes_nothing_verifies_nothing(steerable, tmp_path):
    """With a strength unit of 1e-6 the push leaves every text as it was: no latent rises, k
    ranks with all n (ties count against it), p = 1, not verified."""
    sae = tmp_path / 'sae'
    shutil.copytree(steerable['weak'], sae)
    run(*steerable['args'], f'--sae_path={sae}')
    r = json.load(open(sae / 'verify.json'))['latents'][str(steerable['k'])]
    assert all(s == r['samples'][0] for s in r['samples'])
    assert r['rank'] == [len(steerable['E'])] * 2 and r['p'] == 1 and not r['verified']

def test_verify_is_the_same_with_the_same_seed_and_after_a_kill(steerable, tmp_path):
    """Two runs with the same seed write the same verify.json; a run killed (kill -9) after its
    first latent, then run again, writes it too, and asks the cache for what it had."""
    tok = byte_tokenizer()
    ids = ','.join(str(tok.convert_tokens_to_ids(c)) for c in 'koer')
    for name in ('a', 'b', 'c'):
        shutil.copytree(steerable['sae'], tmp_path / name)
    args = [*steerable['args'][:-2], '--verify=4', f'--latents={ids}']
    for name in ('a', 'b'):
        run(*args, f'--sae_path={tmp_path / name}')
    want = (tmp_path / 'a' / 'verify.json').read_text()
    assert (tmp_path / 'b' / 'verify.json').read_text() == want
    c = tmp_path / 'c'
    p = subprocess.Popen(command(*args, f'--sae_path={c}'), cwd=REPO, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and '"rose"' not in ((c / 'cache.jsonl').read_text()
                                                 if (c / 'cache.jsonl').exists() else ''):
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (c / 'verify.json').exists()  # really interrupted
    run(*args, f'--sae_path={c}')
    assert (c / 'verify.json').read_text() == want

def test_verify_pushes_from_position_1_on(tiny, trained):
    """complete()'s continuation with a push is greedy generation (temperature 0) under a hook
    written here, which adds 4 d_5 to the block's output at positions 1.. of the prompt and at
    every generated token (the tiny model attends: a push at position 0 too would change what it
    writes); the unpushed rows differ."""
    lm, (sae, info), tok = load_lm(tiny['model']), load_sae(trained), tiny['tok']
    block = blocks(lm)[1][info['layer']]
    prompts = torch.tensor([tok(d).input_ids[:8] for d in tiny['docs'][:2]])
    with torch.no_grad():
        new = steer.complete(lm, block, sae, prompts, 1, 0, 0, 24,
                             [lambda h: h, steer_fn(sae, 5, 4.0, 'add')])[3]
        v = 4.0 * sae.W_dec[5]

        def push(m, a, o):
            h = capture.hidden(o)
            h[:, int(h.shape[1] > 1):] += v
        handle = block.register_forward_hook(push)
        # in a batch of complete's shape (2 hooks' rows of 2 prompts): the same kernels
        out = lm.generate(prompts.repeat(2, 1), max_new_tokens=25, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        handle.remove()
    assert torch.equal(out[0, 8:32], new[1, 0]) and not torch.equal(new[0, 0], new[1, 0])

def test_a_prompts_rows_share_their_noise(tiny, trained):
    """Sampled at temperature 0.7, a prompt's rows draw the same noise: under two hooks that
    change nothing, both write the same tokens and the SAE reads the same means from them, while
    another seed writes other tokens."""
    lm, (sae, info), tok = load_lm(tiny['model']), load_sae(trained), tiny['tok']
    block = blocks(lm)[1][info['layer']]
    prompts = torch.tensor([tok(d).input_ids[:8] for d in tiny['docs'][:4]])
    same = [lambda h: h, lambda h: h]
    a = steer.complete(lm, block, sae, prompts, 1, 0.7, 0, 16, same)
    b = steer.complete(lm, block, sae, prompts, 1, 0.7, 1, 16, same)
    assert torch.equal(a[3][0], a[3][1]) and torch.allclose(a[0][0], a[0][1], atol=1e-5)
    assert not torch.equal(a[3], b[3])

def test_verify_scales_each_rise_by_the_latents_spread_on_the_capture():
    """spread_of on hand-set codes (4 rows, 3 latents): a latent that fired once (2.0 on row 0),
    one on every row at 1.0, one never: the standard deviation of each over all rows, zeros
    included, and at least that of one firing at the median value (1.0): 1 / sqrt(4)."""
    codes = steer.Codes(np.array([2, 1, 1, 1, 1], np.float32), np.array([0, 1, 1, 1, 1], np.int32),
                        np.array([0, 0, 1, 2, 3], np.int32))
    dense = np.array([[2, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]])
    assert np.allclose(steer.spread_of(codes, 3, 4), np.maximum(dense.std(0), 0.5))

def test_the_verdict_p_values_and_the_fdr_cut_by_hand():
    """judge_push on hand-set readouts (2 strengths, 2 prompts, 4 latents, spreads 1, 1, 2, 1):
    the rank counts the latents whose mean rise over the prompts is at least latent 0's (a tie
    counts against it); the strength is the strongest within the KL budget (else the weakest),
    p = the rank there / 4. Benjamini-Hochberg steps up: a p above its
    own threshold is still a discovery when a larger one is within its threshold. The Wilson
    interval's known values; verdicts' false rates counted by hand."""
    spread = torch.tensor([1.0, 1.0, 2.0, 1.0])
    # latent 0 ranks 1st at strength 0; 2nd at strength 1 (1st on prompt 1 alone)
    means = torch.tensor([[[1.0, 0.2, 1.0, 0.1], [0.9, 0.4, 0.2, 0.0]],
                          [[0.5, 0.2, 2.0, 0.1], [0.3, 0.2, 0.2, 0.0]]])
    shares = torch.tensor([[[0.5, 0, 0, 0], [0.3, 0, 0, 0]], [[0.9, 0, 0, 0], [0.7, 0, 0, 0]]])
    near, far = torch.tensor([0.99, 0.01]).log(), torch.tensor([0.001, 0.999]).log()
    base = (torch.zeros(1, 2, 4), None, near.expand(1, 2, 2))
    for second, want_j, want_p in ((near, 1, 2 / 4), (far, 0, 1 / 4)):
        logp = torch.stack([near.expand(2, 2), second.expand(2, 2)])
        p, j, rise, kl, rank, redetect = steer.judge_push(0, (means, shares, logp), base, spread)
        assert (p, j) == (want_p, want_j) and rank.tolist() == [1, 2]
        assert torch.allclose(kl, torch.tensor([0.0, (second.exp() * (second - near)).sum()]))
        assert torch.allclose(rise[:, 0, 2], torch.tensor([0.5, 1.0]))
        assert torch.allclose(redetect, torch.tensor([0.4, 0.8]))
    too_far = (means, shares, far.expand(2, 2, 2))
    assert steer.judge_push(0, too_far, base, spread)[:2] == (1 / 4, 0)
    assert steer.discoveries([0.01, 0.04, 0.03, 0.2, 0.005]).tolist() == [1, 1, 1, 0, 1]
    assert steer.discoveries([0.001, 0.03, 0.034, 0.5]).tolist() == [1, 1, 1, 0]
    assert steer.discoveries([0.02, 0.03]).tolist() == [1, 1]
    assert steer.discoveries([0.06, 0.5]).tolist() == [0, 0]
    assert steer.wilson(0, 10) == [0.0, 0.2775] and steer.wilson(10, 10) == [0.7225, 1.0]
    results = {str(i): {'p': p} for i, p in enumerate([0.001, 0.03, 0.034, 0.5])}
    C = steer.CALIBRATION
    # random run 0 gives latent 0 p = 0.001 (a BH discovery among the four) and latent 1 p = 0.03
    # (within the latents' cut 0.034, not a discovery among the four); every other p is 0.9
    null = {str(i): {'p': [0.9] * C, 'redetect': [[0.1, 0.2, 0.3]] * C} for i in range(4)}
    null['0']['p'][0], null['1']['p'][0] = 0.001, 0.03
    s = steer.verdicts(results, null, 1000)
    assert [v['verified'] for v in results.values()] == [True, True, True, False]
    assert [v['false_rate'] for v in results.values()] == [1 / C, 1 / C, 0, 0]
    assert results['3']['redetect_random'] == pytest.approx([0.1, 0.2, 0.3])
    assert s == {'latents': 4, 'verified': 3, 'share_95': steer.wilson(3, 4),
                 'false_rate': 1 / (4 * C), 'false_rate_95': steer.wilson(1, 4 * C),
                 'median_rank': pytest.approx(32.0)}

def test_a_random_push_ranks_a_latent_anywhere(tiny, trained):
    """calibrate: random directions of a latent's norm pushed into the trained tiny model, each
    judged in the place of every latent. One push's rises rank the n latents 1..n, so, judged in
    every latent's place, its p-values are a uniform draw's: a share a of them within a (less
    where latents tie, as a tie counts against a latent), for a = 0.05, 0.1, 0.25. A strength
    chosen by reading i's rank breaks that: the best rank of the two strengths within the budget
    gives 0.074, 0.146, 0.337 here."""
    lm, (sae, info), tok = load_lm(tiny['model']), load_sae(trained), tiny['tok']
    block = blocks(lm)[1][info['layer']]
    prompts = torch.tensor([tok(d).input_ids[:8] for d in tiny['docs'][:16]])
    codes = steer.encode_all(sae, Path(info['data_dir']) / 'acts.npy')
    n, rows = sae.W_dec.shape[0], np.load(Path(info['data_dir']) / 'acts.npy').shape[0]
    push = functools.partial(steer.complete, lm, block, sae, prompts, 1, 0.7, 0, 16)
    spread = steer.spread_of(codes, n, rows)
    pushes = [s * info['median_norm'] for s in steer.STRENGTHS]
    null = steer.calibrate(push, sae, pushes, 0, push([lambda h: h]), spread, range(n))
    ps = np.array([v['p'] for v in null.values()]).ravel()
    assert len(ps) == n * steer.CALIBRATION
    for a in (0.05, 0.1, 0.25):
        assert int(a * n) / n - 0.01 <= np.mean(ps <= a) <= a, (a, np.mean(ps <= a))

def verify_speed(sae_path='out/smollm2-l15', n=3, dtype='auto', seed=1337):
    """The README's verification speed: seconds per latent at steer.py's constants (PROMPTS
    prompts, the STRENGTHS, NEW_TOKENS new tokens, sampled at the default temperature), the model
    in `dtype` ('auto': what --dtype=auto picks here), n latents of a draw after one to warm up;
    and the calibration's seconds (CALIBRATION random pushes, once per run), and so the seconds
    per latent of a 100-latent run, calibration included:
    python -c 'import test_sae; print(test_sae.verify_speed())'"""
    sae, info = load_sae(sae_path)
    name = sae_script.pick_dtype(dtype, 'cpu')[0]
    lm, tok = capture.load_model(info['model'], 'cpu', name)
    block = blocks(lm)[1][info['layer']]
    docs = capture.read_docs('wiki', 'unseen')[0]
    ids = [x[:steer.PROMPT_TOKENS] for x in tok(docs).input_ids if len(x) >= steer.PROMPT_TOKENS]
    prompts = torch.tensor(ids[::len(ids) // steer.PROMPTS][:steer.PROMPTS])
    cap_dir = Path(info['data_dir'])
    codes, cap = steer.encode_all(sae, cap_dir / 'acts.npy', name), steer.read_capture(cap_dir)
    skip = int(info['capture']['config']['exclude_first'])
    push = functools.partial(steer.complete, lm, block, sae, prompts, skip, steer.temperature,
                             seed, steer.NEW_TOKENS)
    pushes = [s * info['median_norm'] for s in steer.STRENGTHS]
    spread = steer.spread_of(codes, sae.W_dec.shape[0], len(cap['ctx']))
    base = push([lambda h: h])
    latents = np.random.default_rng(seed).permutation(sae.W_dec.shape[0])[:n + 1].tolist()
    times = []
    for i in latents:
        t0 = time.time()
        steer.verify_latent(push, tok, sae, i, pushes, base, spread, codes, cap)
        times.append(time.time() - t0)
    t0 = time.time()
    steer.calibrate(push, sae, pushes, seed, base, spread, latents)
    calibration, per_latent = time.time() - t0, float(np.mean(times[1:]))
    return {'seconds_per_latent': round(per_latent, 2), 'calibration_s': round(calibration, 1),
            'per_latent_of_100': round(per_latent + calibration / 100, 2), 'dtype': name,
            'latents': n, 'prompts': len(prompts), 'strengths': steer.STRENGTHS,
            'new_tokens': steer.NEW_TOKENS}

def verify_design(sae_path='out/smollm2-l15', n=60, randoms=16, seed=1337, keep=None):
    """The README's design study for verify, on n latents of the default draw and `randoms` random
    directions of a latent's norm, each pushed at 0.25, 0.5, 0.75 and 1 x the median norm into
    steer.py's 32 prompts (steer.complete: one batch a latent, the same noise for a prompt's rows),
    greedy and sampled at 0.7. For each variant of the protocol (one choice changed at a time: the
    temperature, the prompts (all 32 or every other one), the strength grid, the KL budget, the
    scale of the rises (the spread or the mean nonzero value), the rule that picks the strength
    (steer.py's, or the best rank on half the prompts, judged on the other half)): the latents
    verified (Benjamini-Hochberg at 5%), and the random directions judged in each latent's place:
    the share of their p-values within 0.05 and the false rate (BH over the latents, for each
    direction). Then the cost of each strength: the random directions' first-token KL and the
    clean model's NLL per new token. The default variant's p-values are checked against
    steer.judge_push's. `keep`: a file that holds the collected runs (read when it exists, else
    written).
    python -c 'import test_sae; test_sae.verify_design()'"""
    sae, info = load_sae(sae_path)
    name = sae_script.pick_dtype('auto', 'cpu')[0]
    lm, tok = capture.load_model(info['model'], 'cpu', name)
    block = blocks(lm)[1][info['layer']]
    docs = capture.read_docs('wiki', 'unseen')[0]
    L = steer.PROMPT_TOKENS
    ids = [x[:L] for x in tok(docs).input_ids if len(x) >= L]
    prompts = torch.tensor(ids[::len(ids) // steer.PROMPTS][:steer.PROMPTS])
    cap_dir = Path(info['data_dir'])
    codes, cap = steer.encode_all(sae, cap_dir / 'acts.npy', name), steer.read_capture(cap_dir)
    N, unit = sae.W_dec.shape[0], info['median_norm']
    chosen = steer.choose(codes, cap, N, n, [], seed, 'verify')
    spread = steer.spread_of(codes, N, len(cap['ctx']))
    fired = np.maximum(np.bincount(codes.lat, minlength=N), 1)
    scales = {'spread': spread, 'mean nonzero': torch.from_numpy(
        np.bincount(codes.lat, codes.vals.astype(float), N) / fired).float().clamp_min(1e-3)}
    grid = [0.25, 0.5, 0.75, 1.0]
    ks = [grid.index(s) for s in steer.STRENGTHS]
    skip = int(info['capture']['config']['exclude_first'])
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(randoms, sae.W_dec.shape[1], generator=g), dim=1)
    data, t0 = torch.load(keep) if keep and os.path.exists(keep) else {}, time.time()
    for T in (0.0, 0.7) if not data else ():
        push = functools.partial(steer.complete, lm, block, sae, prompts, skip, T, seed,
                                 steer.NEW_TOKENS)
        base = push([lambda h: h])
        # per run: every latent's means (K, P, n) and the first new token's KL per prompt (K, P)
        kl = lambda run: (run[2].exp() * (run[2] - base[2])).sum(-1)
        lat, rnd = {}, []
        for i in steer.progress(f'latents at T={T}', chosen):
            run = push([steer_fn(sae, i, s * unit, 'add') for s in grid])
            p = steer.judge_push(i, tuple(t[ks] for t in run), base, spread)[0]
            lat[i] = (run[0], kl(run), p)

        # the clean model's NLL per new token, the prompt and the new tokens read again unsteered
        @torch.no_grad()
        def nll(new):
            seqs = torch.cat([prompts.repeat(len(new), 1), new.flatten(0, 1)], 1)
            out = []
            for c in seqs.split(32):
                logp = lm(input_ids=c, logits_to_keep=steer.NEW_TOKENS + 1).logits[:, :-1]
                out.append(-logp.float().log_softmax(-1).gather(2, c[:, L:, None]).mean((1, 2)))
            return torch.cat(out).view(len(new), -1).mean(1)
        for d in steer.progress(f'random directions at T={T}', dirs):
            run = push([lambda h, v=s * unit * d: h + v for s in grid])
            rnd.append((run[0], kl(run), nll(run[3])))
        data[T] = (base[0][0], lat, rnd, nll(base[3]).item())
    print(f"collected in {time.time() - t0:.0f}s ({name}): {n} latents, {randoms} random ones")
    if keep and not os.path.exists(keep):
        torch.save(data, keep)

    # the strength: the strongest within the KL budget, p from all the prompts ('kl', steer.py's);
    # or i's best rank on the even prompts within the budget, p from the odd ones ('rank')
    def p_value(i, means, kls, base, scale, ks, ps, budget, choose):
        rise = (means[ks][:, ps] - base[ps]) / scale
        within = kls[ks][:, ps].mean(1) <= budget
        if choose == 'kl':
            j = int(within.nonzero().max()) if within.any() else 0
            r = rise[j].mean(0)
            return (r >= r[i]).sum().item() / N, grid[ks[j]]
        a, b = ((r >= r[:, [i]]).sum(1) for r in (rise[:, o::2].mean(1) for o in (0, 1)))
        j = int(torch.where(within, a, N).argmin())
        return b[j].item() / N, grid[ks[j]]
    default = {'T': 0.7, 'prompts': 32, 'grid': tuple(ks), 'budget': steer.KL_BUDGET,
               'scale': 'spread', 'choose': 'kl'}
    variants = [{}, {'T': 0.0}, {'prompts': 16}, {'grid': (1,)}, {'grid': (0, 1)},
                {'grid': (0, 1, 2)}, {'grid': (1, 2, 3)}, {'grid': (0, 1, 2, 3)},
                {'budget': math.inf}, {'budget': 3.0}, {'budget': 1.5}, {'scale': 'mean nonzero'},
                {'choose': 'rank'}, {'choose': 'rank', 'budget': 3.0}, {'choose': 'rank', 'T': 0.0}]
    for change in variants:
        v = {**default, **change}
        base, lat, rnd, _ = data[v['T']]
        args = (scales[v['scale']], list(v['grid']), slice(0, 32, 32 // v['prompts']), v['budget'],
                v['choose'])
        got = [p_value(i, m, k, base, *args) for i, (m, k, _) in lat.items()]
        ps = [p for p, _ in got]
        if not change:
            assert np.allclose(ps, [p for *_, p in lat.values()]), 'not the protocol of steer.py'
        null = np.array([[p_value(i, m, k, base, *args)[0] for i in lat] for m, k, _ in rnd])
        false = np.mean([steer.discoveries(q).mean() for q in null])
        k = int(steer.discoveries(ps).sum())
        print(f"{str(change or 'default: ' + str(default)):90s} verified {k}/{n} "
              f"{steer.wilson(k, n)} | random: p<=0.05 {np.mean(null <= 0.05):.3f}, false rate "
              f"{false:.3f} | strengths {dict(Counter(s for _, s in got))}")
    for T, (_, _, rnd, base_nll) in data.items():
        kls = torch.stack([k.mean(1) for _, k, _ in rnd]).mean(0).tolist()
        nlls = torch.stack([x for *_, x in rnd]).mean(0).tolist()
        print(f"T={T}: random pushes at {grid}: first-token KL {[round(x, 2) for x in kls]}, "
              f"NLL per new token {[round(x, 2) for x in nlls]} (unsteered {base_nll:.2f})")

# ------------------------------------------------------------------------------------- the README
def test_the_readme_test_count_is_true():
    """The README's test command gives the number of tests, as the suite has them (the file table
    gives no line counts: a forker's edit of a script never fails a test)."""
    readme = open(os.path.join(REPO, 'README.md')).read()
    n = re.search(r'`python -m pytest -q test_sae.py`: (\d+) tests', readme).group(1)
    p = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', 'test_sae.py'],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert f'\n{n} tests collected' in p.stdout, p.stdout[-300:]
