"""Automatic prefix reuse: the keys and values of prompts already computed, kept in host memory in blocks of
`block` tokens, so a request whose prompt starts with them prefills only the rest.

A block is named by a digest of every token up to its end (its parent's name and its own tokens, as vLLM's
prefix caching hashes KV blocks), and keeps its tokens, which a lookup compares too: a match is exact. The pool
is bounded by bytes and evicts the least recently used block first; a chain's blocks are touched last-to-first, so
a prefix outlives the longer ones that extend it. Only blocks whose every token has been computed are stored, so a
request cancelled in mid-prefill offers what it computed, nothing more. The KV states are copies: a block never
depends on the row that computed it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ernie_paddle import kv_file
from ernie_paddle.causal_lm import KV
from ernie_paddle.errors import KVFileError

DEFAULT_PREFIX_CACHE_MEMORY = 1 << 30  # bytes (1 GiB): `serve --prefix-cache-memory`
BLOCK_TOKENS = 32  # tokens per block: a prompt's match ends on a multiple of it
FILE = "prefix-cache.safetensors"  # the pool's file in `--prefix-cache-dir`


def bytes_per_token(config, itemsize: int) -> int:
    """Bytes of one token's keys and values over every layer at `itemsize` bytes an element: what a KV cache row or
    the prefix pool spends per token (the planner, the server's start-up line and the blocks all count so)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def block_name(parent: bytes | None, tokens: np.ndarray) -> bytes:
    """A block's name: a digest of its parent's name (none for a first block) and its own int64 tokens."""
    return hashlib.blake2b((parent or b"") + tokens.tobytes(), digest_size=16).digest()


@dataclass
class Block:
    parent: bytes | None
    tokens: np.ndarray  # [block] int64
    kv: KV  # per layer [kv_heads, block, head_dim] each
    nbytes: int


class PrefixCache:
    """Blocks of computed KV states, at most `max_bytes` of them (0: nothing is kept)."""

    def __init__(self, max_bytes: int, block: int = BLOCK_TOKENS):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which found

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _names(self, tokens: np.ndarray, n: int) -> list[bytes]:
        """The names of the full blocks of tokens[:n]."""
        names: list[bytes] = []
        for s in range(0, n - self.block + 1, self.block):
            names.append(block_name(names[-1] if names else None, tokens[s:s + self.block]))
        return names

    def _chain(self, tokens: np.ndarray, names: list[bytes]) -> list[Block]:
        """The cached blocks of `names` from the first on, up to the first missing one."""
        found = []
        for i, name in enumerate(names):
            b = self.blocks.get(name)
            if b is None or not np.array_equal(b.tokens, tokens[i * self.block:(i + 1) * self.block]):
                break
            found.append(b)
        return found

    def _touch(self, names: list[bytes]) -> None:
        for name in reversed(names):  # the first block ends most recent: evicted last
            self.blocks.move_to_end(name)

    def lookup(self, tokens, limit: int) -> tuple[int, KV | None]:
        """The longest cached prefix of `tokens`, at most `limit` tokens: its length and its KV (None when 0)."""
        tokens = np.asarray(tokens, np.int64)
        self.queried_tokens += len(tokens)
        if not self.enabled:
            return 0, None
        names = self._names(tokens, min(len(tokens), limit + self.block - 1))
        chain = self._chain(tokens, names)
        n = min(len(chain) * self.block, limit)
        if n <= 0:
            return 0, None
        chain = chain[:-(-n // self.block)]
        self._touch(names[:len(chain)])
        self.hit_tokens += n
        kv = [tuple(np.concatenate([b.kv[i][j] for b in chain], axis=1)[:, :n] for j in range(2))
              for i in range(len(chain[0].kv))]
        return n, kv

    def store(self, tokens, n: int, read: Callable[[int, int], KV]) -> None:
        """Keep the full blocks of tokens[:n] (computed: their KV is `read(start, end)`) that are not kept yet."""
        if not self.enabled:
            return
        tokens = np.asarray(tokens, np.int64)
        names = self._names(tokens, n)
        first = len(self._chain(tokens, names))
        if first == len(names):
            self._touch(names)
            return
        start = first * self.block
        kv = read(start, len(names) * self.block)
        self._touch(names[:first])  # the chain's blocks stay last in LRU order: room is made from the others first
        kept = first
        for i in range(first, len(names)):
            s = (i - first) * self.block
            part = [tuple(a[:, s:s + self.block].copy() for a in pair) for pair in kv]
            nbytes = sum(a.nbytes for pair in part for a in pair)
            while self.nbytes + nbytes > self.max_bytes and len(self.blocks) > i:  # never above the bound, even briefly
                self.nbytes -= self.blocks.popitem(last=False)[1].nbytes
            if self.nbytes + nbytes > self.max_bytes:
                break  # the rest of the chain does not fit beside its first blocks
            self._put(names[i], Block(names[i - 1] if i else None, tokens[i * self.block:(i + 1) * self.block].copy(),
                                      part, nbytes))
            kept = i + 1
        self._touch(names[:kept])
        self._evict()

    def _put(self, name: bytes, block: Block) -> None:
        old = self.blocks.pop(name, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self.blocks[name] = block
        self.nbytes += block.nbytes

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self.blocks:
            _, b = self.blocks.popitem(last=False)
            self.nbytes -= b.nbytes

    def tokens(self) -> int:
        return len(self.blocks) * self.block

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0

    # ---- a pool kept across restarts -------------------------------------------------------------------------
    def save(self, path: str, identity: dict[str, str]) -> None:
        """Write every block (least recently used first, so a load keeps the order) to `path`, atomically."""
        names = list(self.blocks)
        index = {name: i for i, name in enumerate(names)}
        blocks = [self.blocks[n] for n in names]
        if not blocks:
            tokens = np.zeros((0, self.block), np.int64)
            layers: list = []
        else:
            tokens = np.stack([b.tokens for b in blocks])
            layers = [tuple(np.stack([b.kv[i][j] for b in blocks]) for j in range(2)) for i in range(len(blocks[0].kv))]
        parents = np.array([index.get(b.parent, -1) if b.parent else -1 for b in blocks], np.int64)
        kv_file.write(path, kv_file.BLOCKS, identity, tokens, layers, {kv_file.PARENTS: parents})

    def load(self, path: str, identity: dict[str, str]) -> int:
        """Add the blocks saved at `path` by the model of `identity` (KVFileError otherwise); how many were added.
        A block whose parent was not saved is dropped: it could never be reached."""
        tokens, layers, f = kv_file.read(path, kv_file.BLOCKS, identity)
        parents = f.get(kv_file.PARENTS) if kv_file.PARENTS in f.tensors else None
        if tokens.ndim != 2 or (len(tokens) and tokens.shape[1] != self.block) or parents is None or \
                parents.shape != (len(tokens),):
            raise KVFileError(f"{path}: blocks of {list(tokens.shape)} tokens; this server keeps blocks of "
                              f"{self.block}")
        # the file is in LRU order, where a chain's first block comes last: names are found from the first blocks
        # down (a block whose parent is missing, out of range or in a cycle is never reached)
        children: dict[int, list[int]] = {}
        for i, p in enumerate(parents.tolist()):
            children.setdefault(int(p), []).append(i)
        names: dict[int, tuple[bytes | None, bytes]] = {}  # block -> (its parent's name, its name)
        todo: list[tuple[int, bytes | None]] = [(i, None) for i in children.get(-1, [])]
        while todo:
            i, parent = todo.pop()
            name = block_name(parent, tokens[i])
            names[i] = (parent, name)
            todo += [(c, name) for c in children.get(i, [])]
        for i in sorted(names):  # in the file's order: the least recently used first
            parent, name = names[i]
            part = [tuple(a[i].copy() for a in pair) for pair in layers]  # not views: an evicted block is freed
            self._put(name, Block(parent, tokens[i].copy(), part, sum(a.nbytes for pair in part for a in pair)))
        self._evict()
        return len(names)
