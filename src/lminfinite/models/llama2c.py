"""Load llama2.c checkpoints as HuggingFace `LlamaForCausalLM`, with their tokenizers.

This module owns the llama2.c file formats: the legacy (version 0) `.bin` checkpoint, converted to HF
weights (q/k rows permuted from llama2.c's interleaved RoPE pairs to HF's rotate-half layout), and the two
tokenizer files that come with such checkpoints:

- a SentencePiece `*.model` (e.g. `tok512.model`) becomes a real `transformers.LlamaTokenizer`, configured
  to give exactly SentencePiece's ids (BPE merges ranked by piece score, SentencePiece's default
  whitespace clean-up: leading/trailing spaces dropped, runs of spaces collapsed; literal "<s>" text is
  not treated as a special token). Assumes a BPE SentencePiece model, as llama2.c's `train_vocab.sh` makes.
- a llama2.c `tok*.bin` vocabulary (pieces and scores only) becomes a small `Llama2cTokenizer` that
  encodes exactly like llama2.c's `encode()`: raw text (no whitespace clean-up), a dummy " " prefix, byte
  fallback, then greedy merging of the adjacent pair whose merged piece scores highest (leftmost on ties).
  Its merge loop is quadratic in the text length: fine for prompts, slow for whole books.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import BatchEncoding, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer (version >= 1) export, not supported here


def load_llama2c(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[LlamaForCausalLM, LlamaTokenizer | Llama2cTokenizer]:
    """Model (eval mode) and tokenizer of a llama2.c `.bin`; by default the tokenizer file beside it."""
    path = _existing_file(checkpoint, "checkpoint")
    header, tensors = read_checkpoint(path)
    tok = load_tokenizer(tokenizer if tokenizer is not None else find_tokenizer(path.parent))
    if len(tok) != header["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} tokens, checkpoint {path} has vocab {header['vocab_size']}")
    config = llama_config(header)
    model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.load_state_dict(hf_state_dict(header, tensors), strict=True)  # copies (and casts) into place
    model.generation_config.pad_token_id = PAD_ID
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------- checkpoint


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Header fields and float32 arrays (llama2.c names and shapes) of a legacy llama2.c `.bin` checkpoint."""
    path = _existing_file(path, "checkpoint")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise ValueError(f"{path} is {size} bytes, too short for a llama2.c header ({_HEADER.size} bytes)")
    if struct.unpack_from("<I", head)[0] == _MAGIC_V1:
        raise ValueError(f"{path} is a llama2.c version>=1 export; only the legacy version 0 format is supported")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack(head)
    h = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads)
    h.update(vocab_size=abs(vocab), seq_len=seq_len, tied=int(vocab > 0))
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len) <= 0 or max(h.values()) > 1 << 20:
        raise ValueError(f"{path} does not look like a llama2.c checkpoint (header {h})")
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ValueError(f"{path}: inconsistent header {h} (dim, n_heads, n_kv_heads do not divide evenly)")
    L, V, kv_dim, half = n_layers, abs(vocab), n_kv_heads * dim // n_heads, dim // n_heads // 2
    shapes = {
        "tok_emb": (V, dim),
        "rms_att": (L, dim),
        "wq": (L, dim, dim),
        "wk": (L, kv_dim, dim),
        "wv": (L, kv_dim, dim),
        "wo": (L, dim, dim),
        "rms_ffn": (L, dim),
        "w1": (L, hidden, dim),
        "w2": (L, dim, hidden),
        "w3": (L, hidden, dim),
        "rms_final": (dim,),
        "freq_cis_real": (seq_len, half),
        "freq_cis_imag": (seq_len, half),
    }
    if vocab < 0:
        shapes["wcls"] = (V, dim)
    expected = _HEADER.size + 4 * sum(int(np.prod(s)) for s in shapes.values())
    if size != expected:
        what = "truncated or corrupt" if size < expected else "has trailing bytes (wrong format?)"
        raise ValueError(
            f"{path} {what}: header {h} implies {expected} bytes, file has {size} "
            f"({'un' if vocab < 0 else ''}tied classifier, legacy llama2.c version 0 layout)"
        )
    flat = np.fromfile(path, dtype="<f4", offset=_HEADER.size)
    tensors, pos = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        tensors[name] = flat[pos : pos + n].reshape(shape)
        pos += n
    return h, tensors


def llama_config(h: dict[str, int]) -> LlamaConfig:
    """The `LlamaConfig` of a llama2.c model (header from `read_checkpoint`)."""
    return LlamaConfig(
        vocab_size=h["vocab_size"],
        hidden_size=h["dim"],
        intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"],
        num_attention_heads=h["n_heads"],
        num_key_value_heads=h["n_kv_heads"],
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=bool(h["tied"]),
    )


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from llama2.c's interleaved RoPE pairs to HF's rotate-half halves."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def hf_state_dict(h: dict[str, int], t: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` state dict from llama2.c tensors (see `read_checkpoint`)."""
    w = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in t.items()}
    sd = {
        "model.embed_tokens.weight": w["tok_emb"],
        "model.norm.weight": w["rms_final"],
        "lm_head.weight": w.get("wcls", w["tok_emb"]),
    }
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = permute_rope(w["wq"][i], h["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = permute_rope(w["wk"][i], h["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    return sd


# ----------------------------------------------------------------------------------------------- tokenizer


def find_tokenizer(folder: str | os.PathLike) -> Path:
    """The tokenizer in `folder`: a SentencePiece `*.model` if there is one, else a llama2.c `tok*.bin`."""
    folder = Path(folder)
    for pattern in ("*.model", "tok*.bin"):
        found = sorted(folder.glob(pattern))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"several tokenizer files in {folder} ({names}); pass tokenizer= explicitly")
        if found:
            return found[0]
    raise FileNotFoundError(
        f"no tokenizer beside the checkpoint: {folder} has neither a SentencePiece *.model nor a llama2.c "
        "tok*.bin vocabulary; pass tokenizer= explicitly"
    )


def load_tokenizer(path: str | os.PathLike) -> LlamaTokenizer | Llama2cTokenizer:
    """Tokenizer from a SentencePiece `.model` (HF `LlamaTokenizer`) or a llama2.c `.bin` vocabulary."""
    path = Path(path)
    if path.is_dir():
        path = find_tokenizer(path)
    path = _existing_file(path, "tokenizer")
    if path.suffix == ".model":
        return sentencepiece_tokenizer(path)
    if path.suffix == ".bin":
        return Llama2cTokenizer.from_file(path)
    raise ValueError(f"unknown tokenizer file type {path} (expected a SentencePiece .model or llama2.c .bin)")


def sentencepiece_tokenizer(path: str | os.PathLike) -> LlamaTokenizer:
    """A `transformers.LlamaTokenizer` giving the same ids as SentencePiece for a llama2.c BPE `.model`."""
    import sentencepiece as spm
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    if pieces[:3] != ["<unk>", "<s>", "</s>"]:
        raise ValueError(f"{path}: expected <unk>, <s>, </s> as ids 0-2, got {pieces[:3]}")
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, {p: sp.get_score(i) for i, p in enumerate(pieces)})
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        split_special_tokens=True,
    )
    backend = tok.backend_tokenizer
    # SentencePiece's remove_extra_whitespaces (on by default): only U+0020 counts, newlines are kept.
    backend.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    # The dummy prefix goes on even when the (now removed) leading spaces moved the first offset.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    sample = "Once upon a time,  Lily saw 42 cats!\n\tThe end. "
    if tok.encode(sample, add_special_tokens=False) != sp.encode(sample):
        raise ValueError(f"{path}: HF BPE conversion does not reproduce SentencePiece (not a BPE model?)")
    return tok


class Llama2cTokenizer:
    """llama2.c's tokenizer from its `tok*.bin` vocabulary, with the HF tokenizer calls generation uses."""

    bos_token_id, eos_token_id, pad_token_id, unk_token_id = BOS_ID, EOS_ID, PAD_ID, 0
    bos_token, eos_token, pad_token, unk_token = "<s>", "</s>", "<unk>", "<unk>"
    padding_side = "left"

    def __init__(self, pieces: list[bytes], scores: list[float]):
        self.pieces, self.scores = pieces, scores
        self.ids = {p: i for i, p in enumerate(pieces)}
        self._byte = {i: int(m[1], 16) for i, p in enumerate(pieces) if (m := re.fullmatch(rb"<0x([0-9A-F]{2})>", p))}
        self._special = {0: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Llama2cTokenizer:
        """Read llama2.c's format: uint32 max_token_length, then per id float32 score, int32 length, bytes."""
        data = _existing_file(path, "tokenizer").read_bytes()
        pieces, scores, pos = [], [], 4
        try:
            while pos < len(data):
                score, n = struct.unpack_from("<fi", data, pos)
                if n < 0 or pos + 8 + n > len(data):
                    raise struct.error(f"piece length {n} at byte {pos}")
                pieces.append(data[pos + 8 : pos + 8 + n])
                scores.append(score)
                pos += 8 + n
        except struct.error as e:
            raise ValueError(f"{path} is not a valid llama2.c tokenizer file ({e})") from None
        if len(pieces) < 259:
            raise ValueError(f"{path}: {len(pieces)} pieces, expected <unk>, <s>, </s> and 256 byte tokens")
        return cls(pieces, scores)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def _piece_id(self, piece: bytes) -> list[int]:
        i = self.ids.get(piece)
        return [i] if i is not None else [self.ids[b"<0x%02X>" % b] for b in piece]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as llama2.c's `encode(text, bos=add_special_tokens, eos=False)`."""
        toks = self._piece_id(b" ") if text else []
        for ch in text:
            toks += self._piece_id(ch.encode("utf-8", "surrogatepass"))
        pairs = [self._pair_score(a, b) for a, b in zip(toks, toks[1:], strict=False)]
        while pairs and (best := max(pairs)) > -np.inf:
            k = pairs.index(best)  # leftmost best pair, like llama2.c
            toks[k : k + 2] = [self.ids[self.pieces[toks[k]] + self.pieces[toks[k + 1]]]]
            del pairs[k]
            if k > 0:
                pairs[k - 1] = self._pair_score(toks[k - 1], toks[k])
            if k < len(pairs):
                pairs[k] = self._pair_score(toks[k], toks[k + 1])
        return [BOS_ID] + toks if add_special_tokens else toks

    def _pair_score(self, a: int, b: int) -> float:
        i = self.ids.get(self.pieces[a] + self.pieces[b])
        return -np.inf if i is None else self.scores[i]

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Text of `ids`; the dummy-prefix space of the first ordinary token is dropped (as SentencePiece)."""
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        ids = [ids] if isinstance(ids, int) else ids
        out, first = [], True
        for i in ids:
            if i in self._special:
                if not skip_special_tokens:
                    out.append(self._special[i].encode())
                continue
            piece = bytes([self._byte[i]]) if i in self._byte else self.pieces[i]
            out.append(piece[1:] if first and piece.startswith(b" ") else piece)
            first = False
        return b"".join(out).decode("utf-8", errors="replace")

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.pieces[ids].decode("utf-8", errors="replace")
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def __call__(
        self,
        text: str | list[str],
        return_tensors: str | None = None,
        padding: bool | str = False,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchEncoding:
        """`input_ids` and `attention_mask`; `padding=True`/"longest"/"max_length" pads on the left with 0."""
        if kwargs.get("truncation"):
            raise ValueError("Llama2cTokenizer does not truncate; slice the ids instead")
        batch = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in batch]
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"unsupported padding={padding!r}")
        width = max(map(len, ids), default=0)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max(width, max_length)
        if padding in (False, "do_not_pad"):
            width = 0
        mask = [[0] * (width - len(x)) + [1] * len(x) for x in ids]
        ids = [[PAD_ID] * (width - len(x)) + x for x in ids]
        data = {"input_ids": ids, "attention_mask": mask}
        if isinstance(text, str) and return_tensors is None:  # HF: one text, no tensors -> flat lists
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c {what} file not found: {path}")
    return path
