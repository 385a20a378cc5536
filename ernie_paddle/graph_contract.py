"""The exported graph's contract: its input and output names, the values the parity report reads, what each flavour
means for the KV cache and positions, and the manifest keys.

The exporters (`export/`, `paddle.portable_export`) write what is named here and the readers (`ort.runtime`,
`export.genai`, `export.kv_cache`, `parity.probes`) look it up here: neither side spells a name itself. The input
and output names are onnxruntime-genai's, which existing folders and genai rely on. Plain Python: no numpy,
Paddle or onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass

from ernie_paddle.errors import OnnxFolderError
from ernie_paddle.files import MANIFEST

# ---- inputs and outputs ---------------------------------------------------------------------------------------------
INPUT_IDS = "input_ids"  # [batch, sequence] int64
ATTENTION_MASK = "attention_mask"  # [batch, total_sequence] int64: a row's length is its sum (right padding)
POSITION_IDS = "position_ids"  # [batch, sequence] int64: only graphs that do not derive positions from the mask
LOGITS_TO_KEEP = "logits_to_keep"  # optional scalar int64: the LM head on the last N positions only (0: all)
LOGITS = "logits"  # [batch, sequence, vocab] float32: the first output
KV = ("key", "value")
PAST = {kv: f"past_key_values.%d.{kv}" for kv in KV}  # per layer, genai's %d patterns
PRESENT = {kv: f"present.%d.{kv}" for kv in KV}

# dynamic dimension names both flavours give their inputs and outputs
BATCH, SEQUENCE, TOTAL_SEQUENCE, PAST_SEQUENCE = ("batch_size", "sequence_length", "total_sequence_length",
                                                  "past_sequence_length")


def past(layer: int, kv: str) -> str:
    """The cache input of `layer` ("key" or "value")."""
    return PAST[kv] % layer


def present(layer: int, kv: str) -> str:
    """The cache output of `layer` ("key" or "value"): the grown cache, or the shared buffer's new contents."""
    return PRESENT[kv] % layer


def _slot(patterns: dict[str, str], name: str) -> tuple[int, str] | None:
    for kv, pattern in patterns.items():
        head, tail = pattern.split("%d")
        middle = name[len(head):len(name) - len(tail)]
        if name.startswith(head) and name.endswith(tail) and middle.isdigit():
            return int(middle), kv
    return None


def past_slot(name: str) -> tuple[int, str] | None:
    """(layer, "key" | "value") when `name` is a cache input, else None."""
    return _slot(PAST, name)


def present_slot(name: str) -> tuple[int, str] | None:
    """(layer, "key" | "value") when `name` is a cache output, else None."""
    return _slot(PRESENT, name)


def is_cache(name: str) -> bool:
    """Whether `name` is a cache input or output."""
    return past_slot(name) is not None or present_slot(name) is not None


def per_layer(patterns: dict[str, str], num_layers: int) -> list[str]:
    """Every layer's key then value name of `patterns` (PAST or PRESENT), layer 0 first: the graph's order."""
    return [patterns[kv] % i for i in range(num_layers) for kv in KV]


# ---- values the parity report exposes (the ort flavour names them; they are not outputs of the folder's graph) ---
def hidden_state(i: int) -> str:
    """The residual stream after `i` decoder layers: 0 is the embeddings, num_layers the final norm's output
    (transformers' `hidden_states` convention)."""
    return f"hidden_states.{i}"


def router_scores(layer: int) -> str:
    """The scores a MoE layer's experts op selects on (its top k are the chosen experts)."""
    return f"router_scores.{layer}"


# ---- flavours -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flavor:
    """An export flavour and what its graph promises its runner."""

    name: str
    shares_kv_buffer: bool  # one preallocated [B, nkv, max_len, d] buffer per layer is both past and present
    positions_from_mask: bool  # no position_ids input: positions are cumsum(attention_mask) - 1
    keeps_logits: bool  # has the optional logits_to_keep input
    names_probes: bool  # its graph names the hidden_state / router_scores values

    @property
    def has_position_ids(self) -> bool:
        return not self.positions_from_mask

    def sequence_inputs(self) -> list[str]:
        """The inputs before the cache."""
        return [INPUT_IDS, ATTENTION_MASK] + ([POSITION_IDS] if self.has_position_ids else [])

    def inputs(self, num_layers: int) -> list[str]:
        """The graph's inputs, in order."""
        return self.sequence_inputs() + per_layer(PAST, num_layers) + ([LOGITS_TO_KEEP] if self.keeps_logits else [])

    def outputs(self, num_layers: int) -> list[str]:
        """The graph's outputs, in order."""
        return [LOGITS] + per_layer(PRESENT, num_layers)


# GroupQueryAttention updates the cache in place and reads each row's length and positions from the mask
ORT = Flavor("ort", shares_kv_buffer=True, positions_from_mask=True, keeps_logits=True, names_probes=True)
# standard operators from paddle2onnx: the cache grows by concat, positions are an input
PORTABLE = Flavor("portable", shares_kv_buffer=False, positions_from_mask=False, keeps_logits=False,
                  names_probes=False)
FLAVORS = {f.name: f for f in (ORT, PORTABLE)}

# ---- manifest.json --------------------------------------------------------------------------------------------------
FORMAT = "format"
FORMAT_VERSION = "ernie-paddle-onnx/1"
FLAVOR = "flavor"
PRECISION = "precision"
MODEL_FILE = "model_file"  # the graph's file name in the folder
EXTERNAL_DATA = "external_data"  # the graph's weight files, which must all be present
KV_CACHE = "kv_cache"  # "fp32" or "int8"
BLOCK_SIZE = "block_size"  # weights per quantisation block (None: not quantised)
INPUTS, OUTPUTS = "inputs", "outputs"  # the graph's names, a layer's cache as N


def manifest_io(flavor: Flavor) -> dict[str, list[str]]:
    """The manifest's description of the graph's inputs and outputs (the cache once, its layer as N)."""
    past_n, present_n = ([patterns[kv].replace("%d", "N") for kv in KV] for patterns in (PAST, PRESENT))
    return {INPUTS: flavor.sequence_inputs() + past_n, OUTPUTS: [LOGITS] + present_n}


def flavor_of(manifest: dict, folder: str) -> Flavor:
    """The flavour the folder's manifest names (OnnxFolderError when it names none the project exports)."""
    name = manifest.get(FLAVOR)
    if name not in FLAVORS:
        raise OnnxFolderError(f"{folder}: {MANIFEST} names flavor {name!r}; expected one of {', '.join(FLAVORS)}")
    return FLAVORS[name]
