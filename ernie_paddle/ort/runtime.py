"""Run an exported ERNIE-4.5 ONNX folder with ONNX Runtime: no Paddle, only `onnxruntime` and `numpy` (and
`onnx` to check the external data file before a session reads it).

`OnnxCausalLM` offers the same small interface as the Paddle model (`config`, `check_ids`, `allocate_cache`,
a call returning logits), so `ernie_paddle.generation` drives both: greedy and sampling, streaming, and
batches padded on the right (onnxruntime-genai's convention: a row's length is the sum of its attention_mask). The KV cache lives in OrtValues on the execution provider's device, bound through IOBinding:
for the `ort` flavour one preallocated [B, kv_heads, max_len, head_dim] buffer per layer that GroupQueryAttention
updates in place (bound as both `past_key_values.N.*` and `present.N.*`); for the portable flavour the
`present.N.*` outputs, which are the grown cache, are fed back as the next step's past.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from ernie_paddle import files
from ernie_paddle import graph_contract as contract
from ernie_paddle.causal_lm import KV
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import InputError, OnnxFolderError
from ernie_paddle.textfile import read_json_object
from ernie_paddle.precisions import BITS
from ernie_paddle.token_ids import check_token_ids
from ernie_paddle.rope import check_position_ids
from ernie_paddle.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS

@dataclass
class OnnxCache:
    """past_key_values for the next step: OrtValues per layer (key, value), and how many slots are filled."""

    layers: list = field(default_factory=list)
    max_len: int = 0
    length: int = 0
    shared: bool = False  # layers are [B, nkv, max_len, d] buffers that GQA updates in place (past = present)
    binding: object = None  # the shared cache's IOBinding, its past/present bound once for every step
    mask: np.ndarray | None = None  # [B, max_len]: decode steps' attention_mask at one shape (see __call__)
    arrays: list | None = None  # a shared cache in host memory: the numpy arrays its OrtValues view, per layer


@dataclass
class OnnxOutput:
    logits: np.ndarray  # [B, T, V] float32


def folder_identity(folder: str, manifest: dict, kv_dtype) -> dict[str, str]:
    """`CausalLM.identity` of an exported folder: the checkpoint it came from (the manifest's digest of its files),
    this export (a digest of its manifest, which differs between any two exports) and the cache dtype."""
    with open(os.path.join(folder, files.MANIFEST), "rb") as f:
        export = hashlib.sha256(f.read()).hexdigest()[:16]
    source = manifest.get("source") or {}
    model = source.get("sha256", "")[:16] or f"generated tensors (export {export})"
    return {"model": model, "export": f"onnx {manifest.get(contract.FLAVOR)} {export}",
            "kv_dtype": np.dtype(kv_dtype).name}


def load_manifest(folder: str) -> dict:
    path = os.path.join(folder, files.MANIFEST)
    if not os.path.isfile(path):
        raise OnnxFolderError(f"{folder}: not an exported model folder (no {files.MANIFEST}); create one with "
                              f"`ernie-paddle export`")
    return read_json_object(path, OnnxFolderError)


def check_external_data(model_path: str, data_dir: str | None = None) -> None:
    """Every external-data file the graph names must exist and hold the bytes its tensors need, so a missing or
    truncated file is named itself (ONNX Runtime's own error names the .onnx file). They are looked for in
    `data_dir` (default: beside the graph)."""
    import onnx

    try:
        graph = onnx.load(model_path, load_external_data=False).graph
    except Exception:  # protobuf's DecodeError and friends: the session will name the .onnx file itself
        return
    need: dict[str, int] = {}
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        length = int(info["length"]) if "length" in info else \
            int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        end = int(info.get("offset", 0)) + length
        need[info["location"]] = max(need.get(info["location"], 0), end)
    for name, end in need.items():
        path = os.path.join(data_dir or os.path.dirname(model_path), name)
        if not os.path.isfile(path):
            raise OnnxFolderError(f"{path}: missing (the external data of {os.path.basename(model_path)})")
        if os.path.getsize(path) < end:
            raise OnnxFolderError(f"{path}: truncated: {os.path.getsize(path)} bytes, the graph's tensors need "
                                  f"{end}")


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def prompt_feeds(ids, cfg: ErnieConfig, kv_dtype=np.float32) -> dict:
    """`session.run` inputs for one prompt [T] with an empty cache: ids, an all-ones mask, zero-length pasts."""
    feeds = {INPUT_IDS: np.asarray(ids, np.int64)[None], ATTENTION_MASK: np.ones((1, len(ids)), np.int64)}
    for i in range(cfg.num_hidden_layers):
        for kv in contract.KV:
            feeds[contract.past(i, kv)] = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), kv_dtype)
    return feeds


def _graph_with_required(model_path: str, name: str) -> str | bytes:
    """The graph at `model_path`, with the optional input `name` made a plain input when the graph has it.

    An optional input is an initializer of the same name, its default (what onnxruntime-genai leaves alone); ONNX
    Runtime binds such inputs in `run` but not through IOBinding, so this runtime drops the default and always feeds
    the input. The weights stay in the folder's external data. Other graphs: the path, unchanged."""
    import onnx

    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception:  # noqa: BLE001 - a corrupt file: the session names it
        return model_path
    defaults = [t for t in model.graph.initializer if t.name == name]
    if not defaults or name not in {i.name for i in model.graph.input}:
        return model_path
    model.graph.initializer.remove(defaults[0])
    return model.SerializeToString()


def _positions_from_mask(mask: np.ndarray, t: int) -> np.ndarray:
    """Positions of the last `t` slots: cumsum(attention_mask) - 1, pads clipped to 0 (as the ort graph does)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -t:]


class OnnxCausalLM:
    """An exported folder opened in an ONNX Runtime session: a `causal_lm.CausalLM`."""

    # ONNX Runtime 1.32's GroupQueryAttention refuses several new tokens over a past when batch > 1
    # ("batch_size must be 1 when sequence_length > 1 and past context is given"): batches prefill in one pass
    chunked_prefill_max_batch = 1

    def __init__(self, folder: str, provider: str = "cpu", threads: int | None = None, model_file: str | None = None,
                 spinning: bool = True):
        """`model_file` overrides the manifest's graph (the parity report's copy with extra outputs). `spinning`:
        ONNX Runtime's worker threads spin between runs (fastest back to back); a server turns it off so that they
        leave the cores to the event loop between steps."""
        import onnxruntime as ort

        self._ort = ort
        self.folder = folder
        self.manifest = load_manifest(folder)
        self.flavor = contract.flavor_of(self.manifest, folder)
        self.config = ErnieConfig.from_file(os.path.join(folder, files.CONFIG))
        model_path = model_file or os.path.join(folder, self.manifest.get(contract.MODEL_FILE, files.ONNX_MODEL))
        if not os.path.isfile(model_path):
            raise OnnxFolderError(f"{model_path}: missing model file")
        for name in self.manifest.get(contract.EXTERNAL_DATA, []):
            if not os.path.isfile(os.path.join(folder, name)):
                raise OnnxFolderError(f"{os.path.join(folder, name)}: missing external data file listed in "
                                      f"{files.MANIFEST}")
        if provider not in PROVIDERS:
            raise InputError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        precision = self.manifest.get(contract.PRECISION)
        if provider == "cuda" and precision in BITS:
            raise InputError(f"{folder}: a {precision} export holds QMoE/MatMulNBits weights in the CPU layout; "
                             f"CUDA needs its own prepacked layout, not produced yet: run it with --provider cpu, "
                             f"or export fp16 for CUDA")
        check_external_data(model_path, folder)
        ep = PROVIDERS[provider]
        if ep not in ort.get_available_providers():
            raise InputError(f"provider {provider} ({ep}) is not available in this onnxruntime build "
                             f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                             f"for CUDA")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only, and those come back as the exception below
        ort.set_default_logger_severity(3)
        if threads:
            so.intra_op_num_threads = threads
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # a graph kept outside the folder (the parity report's copy) reads its weights from the folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", os.path.abspath(folder))
        try:
            self.session = ort.InferenceSession(_graph_with_required(model_path, LOGITS_TO_KEEP), so, providers=[ep])
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise OnnxFolderError(f"{model_path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        past0 = next(i for i in self.session.get_inputs() if i.name == contract.past(0, "key"))
        self.kv_dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(past0.type, np.float32)
        self.has_position_ids = POSITION_IDS in self.input_names
        self.identity = folder_identity(folder, self.manifest, self.kv_dtype)
        # the ort graph's optional input: LM head on the last N positions only (older folders compute them all)
        self.keeps_logits = LOGITS_TO_KEEP in self.input_names
        # outputs besides logits and the cache (the parity report's copy of the graph exposes hidden states)
        self.extra_outputs = [n for n in self.output_names if n != LOGITS and contract.present_slot(n) is None]
        self.shares_kv_buffer = self.flavor.shares_kv_buffer  # GroupQueryAttention (see allocate_cache)
        n = self.config.num_hidden_layers
        if sum(1 for x in self.input_names if contract.past_slot(x) is not None) != 2 * n:
            raise OnnxFolderError(f"{model_path}: the graph's past_key_values inputs do not match "
                                  f"num_hidden_layers={n} in {files.CONFIG}")

    def check_ids(self, ids: np.ndarray) -> None:
        check_token_ids(ids, self.config.vocab_size)

    def allocate_cache(self, batch: int, max_len: int) -> OnnxCache:
        """The `ort` flavour's GroupQueryAttention writes new keys/values into preallocated [B, nkv, max_len, d]
        buffers bound as both past and present: no per-step copy of the whole cache (3.8 GB a token at 32K tokens
        for the 21B model). Other graphs (portable) return a grown copy each step."""
        import onnxruntime as ort

        cfg = self.config
        shared = self.shares_kv_buffer
        shape = self.cache_shape(batch, max_len if shared else 0)
        if shared and self.device == "cpu":  # numpy arrays the OrtValues view: read and written without copies
            arrays = self.host_cache(batch, max_len)
            layers = [tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in kv) for kv in arrays]
            return OnnxCache(layers, max_len, shared=True, arrays=arrays)
        layers = [tuple(ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device) if shared else
                        ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype), self.device) for _ in "kv")
                  for _ in range(cfg.num_hidden_layers)]
        return OnnxCache(layers, max_len, shared=shared)

    def cache_shape(self, batch: int, max_len: int) -> tuple[int, int, int, int]:
        """A layer's key (or value) buffer: [batch, kv_heads, max_len, head_dim], the graph's past_key_values."""
        return batch, self.config.num_key_value_heads, max_len, self.config.head_dim

    def host_cache(self, batch: int, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Zeroed (key, value) buffers per layer in host memory (pages are touched only when written)."""
        shape = self.cache_shape(batch, max_len)
        return [(np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype))
                for _ in range(self.config.num_hidden_layers)]

    def read_kv(self, cache: OnnxCache, row: int, start: int, end: int) -> KV:
        if cache.arrays is not None:
            return [tuple(a[row, :, start:end].copy() for a in kv) for kv in cache.arrays]
        # a device buffer or a grown cache: the whole OrtValue comes to the host
        return [tuple(v.numpy()[row, :, start:end].copy() for v in layer) for layer in cache.layers]

    def write_kv(self, cache: OnnxCache, row: int, start: int, kv: KV) -> None:
        if len(kv) != len(cache.layers):
            raise InputError(f"a KV state of {len(kv)} layers for a model of {len(cache.layers)}")
        n = kv[0][0].shape[1]
        if start + n > (cache.max_len if cache.shared else self.config.max_position_embeddings):
            raise InputError(f"KV cache holds {cache.max_len} tokens; {start + n} requested")
        batch = cache.layers[0][0].shape()[0]
        if cache.arrays is not None:
            for arrays, pair in zip(cache.arrays, kv):
                for a, x in zip(arrays, pair):
                    a[row, :, start:start + n] = x
        elif cache.shared:  # on the device: the buffer is updated whole
            for layer, pair in zip(cache.layers, kv):
                for v, x in zip(layer, pair):
                    full = v.numpy()
                    full[row, :, start:start + n] = x
                    v.update_inplace(full)
        else:  # a grown cache (batch 1) holds exactly its tokens: it becomes its first `start` ones and `kv`
            cache.layers = [tuple(self._ort.OrtValue.ortvalue_from_numpy(
                np.concatenate([v.numpy()[:, :, :start], x[None]], axis=2), self.device) for v, x in zip(layer, pair))
                for layer, pair in zip(cache.layers, kv)]
            cache.binding = None
        if batch == 1:
            cache.length = start + n

    def allocate_rows(self, capacity: int, max_len: int) -> "OnnxRows":
        """`capacity` rows of one in-place cache in host memory, one sequence a row, for continuous batching: a
        range of rows runs as one batch without copies (a shared-buffer graph only)."""
        if not self.shares_kv_buffer:
            raise InputError(f"{self.folder}: rows of one cache need a graph that updates its cache in place "
                             f"(the ort flavour)")
        return OnnxRows(self, capacity, max_len)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache: OnnxCache | None = None,
                 last_only: bool = False) -> OnnxOutput:
        """One step: input_ids [B, T]; attention_mask [B, past + T]; returns logits (and advances `cache`)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        self.check_ids(ids)
        b, t = ids.shape
        own_cache = cache is None
        cache = cache or self.allocate_cache(b, t)
        total = cache.length + t
        if cache.shared and total > cache.max_len:
            raise InputError(f"KV cache holds {cache.max_len} tokens; {total} requested")
        if total > self.config.max_position_embeddings:
            raise InputError(f"sequence length {total} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        mask = np.ones((b, total), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if cache.shared and mask.ndim == 2 and mask.shape[1] and not mask[:, 0].all():
            raise InputError(f"{self.folder}: attention_mask row {int(np.argmin(mask[:, 0]))} starts with padding: "
                             f"this export reads each row's length from its mask (onnxruntime-genai's convention), "
                             f"so pad prompts on the right")
        if position_ids is not None:
            position_ids = np.asarray(position_ids, np.int64)
            check_position_ids(position_ids, self.config.max_position_embeddings)
            if not self.has_position_ids:
                self._check_positions_from_mask(position_ids, mask, t)
        binding = self._binding(cache)
        keep = last_only and self.keeps_logits
        if self.keeps_logits:
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(int(keep), np.int64))
        logits = np.empty((b, 1 if keep else t, self.config.vocab_size), np.float32)  # ONNX Runtime writes into it
        for name in self.extra_outputs:  # unallocated again: their shapes follow the step's
            binding.bind_output(name, self.device)
        binding.bind_ortvalue_output(LOGITS, self._ort.OrtValue.ortvalue_from_numpy(logits))
        binding.bind_cpu_input(INPUT_IDS, ids)
        binding.bind_cpu_input(ATTENTION_MASK, self._step_mask(cache, mask) if t == 1 and not own_cache else mask)
        if self.has_position_ids:
            if position_ids is None:
                position_ids = _positions_from_mask(mask, t)
            binding.bind_cpu_input(POSITION_IDS, position_ids)
        self.session.run_with_iobinding(binding)
        if not own_cache:
            if not cache.shared:
                bound = [n for n in self.output_names if n != LOGITS] + [LOGITS]  # the order _binding binds
                named = dict(zip(bound, binding.get_outputs()))
                cache.layers = [tuple(named[contract.present(i, kv)] for kv in contract.KV)
                                for i in range(self.config.num_hidden_layers)]
            cache.length = total
        return OnnxOutput(logits[:, -1:] if last_only else logits)  # (already one position when kept)

    def run(self, output_names: list[str] | None, feeds: dict) -> list:
        """`session.run` with the graph's optional inputs at their defaults unless fed (every position's logits)."""
        if self.keeps_logits and LOGITS_TO_KEEP not in feeds:
            feeds = {**feeds, LOGITS_TO_KEEP: np.array(0, np.int64)}
        return self.session.run(output_names, feeds)

    def _step_mask(self, cache: OnnxCache, mask: np.ndarray) -> np.ndarray:
        """A decode step's mask as a [B, max_len] buffer, zeros after the given columns (onnxruntime-genai's way
        with a shared cache). The graph reads only each row's sum (its length) and the last one's cumsum (the new
        token's position), which the zeros leave alone; at one shape every step, ONNX Runtime reuses its plan
        instead of sizing the run anew (about half the per-step time of a small model). A grown cache keeps the
        mask as given: its graph reads the mask's length."""
        if not cache.shared:
            return mask
        if cache.mask is None or cache.mask.shape[0] != mask.shape[0]:
            cache.mask = np.zeros((mask.shape[0], cache.max_len), np.int64)
        cache.mask[:, mask.shape[1]:] = 0
        cache.mask[:, :mask.shape[1]] = mask
        return cache.mask

    def _binding(self, cache: OnnxCache):
        """An IOBinding with the cache bound: made once per shared cache (its buffers never move), anew per step
        for a grown cache. Outputs other than the shared presents go to the device ONNX Runtime chooses."""
        if cache.binding is not None:
            return cache.binding
        binding = self.session.io_binding()
        for i, layer in enumerate(cache.layers):
            for kv, buffer in zip(contract.KV, layer):
                binding.bind_ortvalue_input(contract.past(i, kv), buffer)
        for name in self.output_names:
            if name == LOGITS:
                continue  # bound each step, to a buffer of the step's shape
            slot = contract.present_slot(name)
            if cache.shared and slot is not None:
                binding.bind_ortvalue_output(name, cache.layers[slot[0]][contract.KV.index(slot[1])])
            else:
                binding.bind_output(name, self.device)
        if cache.shared:
            cache.binding = binding
        return binding

    def _check_positions_from_mask(self, given: np.ndarray, mask: np.ndarray, t: int) -> None:
        """A graph without a position_ids input (the ort flavour) derives positions from attention_mask: explicit
        positions are accepted only when they are those, never silently replaced."""
        from_mask = _positions_from_mask(mask, t)
        try:
            given = np.broadcast_to(given, from_mask.shape)
        except ValueError:
            raise InputError(f"position_ids has shape {list(np.shape(given))}, expected "
                             f"{list(from_mask.shape)}") from None
        bad = np.argwhere(given != from_mask)
        if len(bad):
            r, c = (int(i) for i in bad[0])
            raise InputError(f"{self.folder}: this {self.flavor.name} export has no position_ids "
                             f"input: it derives positions from attention_mask (cumsum - 1), and the position_ids "
                             f"given differ (row {r}, token {c}: {int(given[r, c])}, from the mask "
                             f"{int(from_mask[r, c])}); export with --flavor portable to pass explicit positions")

    def logits(self, input_ids) -> np.ndarray:
        """One forward pass without a cache: float32 [T, V] for a 1-D id list, [B, T, V] for 2-D."""
        ids = np.asarray(input_ids, dtype=np.int64)
        out = self(ids).logits
        return out[0] if ids.ndim == 1 else out


class OnnxRows:
    """Rows of one preallocated [rows, kv_heads, max_len, head_dim] cache per layer, held as numpy arrays that
    OrtValues view without copying: a range of rows is one GroupQueryAttention batch updated in place."""

    def __init__(self, model: OnnxCausalLM, capacity: int, max_len: int):
        import onnxruntime as ort

        self.max_len, self._ort = max_len, ort
        self.arrays = model.host_cache(capacity, max_len)
        self._views: dict[tuple[int, int], OnnxCache] = {}

    def view(self, start: int, n: int, length: int) -> OnnxCache:
        """The cache of rows start..start+n-1 holding `length` tokens (OrtValues made once per range)."""
        view = self._views.get((start, n))
        if view is None:
            arrays = [tuple(a[start:start + n] for a in kv) for kv in self.arrays]
            layers = [tuple(self._ort.OrtValue.ortvalue_from_numpy(a) for a in kv) for kv in arrays]
            view = self._views[(start, n)] = OnnxCache(layers, self.max_len, shared=True, arrays=arrays)
        view.length = length
        return view

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `src`'s first `length` cached tokens become row `dst`'s."""
        for kv in self.arrays:
            for a in kv:
                a[dst, :, :length] = a[src, :, :length]
