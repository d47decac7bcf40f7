"""Hugging Face tokenizer loading for data preparation, and a Megatron-compatible adapter.

``load_tokenizer(name_or_path)`` uses ``transformers.AutoTokenizer`` (a hub name, or a local
directory such as ``data_prep/sample/tokenizer``) and hands the workers the fast backend
(``tokenizers.Tokenizer``) as JSON. EOD is the tokenizer's EOS token unless ``eod`` is given.
Token ids are stored as uint16 when the vocabulary fits (< 65500 ids, as Megatron's
``DType.optimal_dtype`` decides), else int32.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

SAMPLE_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "tokenizer")


@dataclass
class TokenizerInfo:
    name: str
    json: str            # tokenizers.Tokenizer serialisation given to the workers
    vocab_size: int      # len(tokenizer), added tokens included
    eod: int
    bos: Optional[int]   # prepended to every document when not None
    dtype: str           # "uint16" or "int32"

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.json.encode("utf-8"))
        h.update(f"{self.eod}/{self.bos}/{self.dtype}".encode())
        return h.hexdigest()[:16]


def load_tokenizer(name_or_path: str, eod: Optional[int] = None, prepend_bos: bool = False) -> TokenizerInfo:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, hub errors
        raise ValueError(f"--tokenizer {name_or_path!r}: cannot load a Hugging Face tokenizer: {e}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"--tokenizer {name_or_path!r}: a fast (tokenizers-backed) tokenizer is required")
    if eod is None:
        eod = hf.eos_token_id
        if eod is None:
            raise ValueError(f"--tokenizer {name_or_path!r} has no EOS token; pass --eod-id")
    bos = None
    if prepend_bos:
        bos = hf.bos_token_id
        if bos is None:
            raise ValueError(f"--prepend-bos: tokenizer {name_or_path!r} has no BOS token")
    vocab = len(hf)
    dtype = "uint16" if vocab < 65500 else "int32"
    return TokenizerInfo(name=name_or_path, json=backend.to_str(), vocab_size=vocab, eod=int(eod),
                         bos=bos, dtype=dtype)


class MegatronTokenizerAdapter:
    """The parts of Megatron's tokenizer interface that GPTDataset / GPTDatasetConfig use
    (``vocab_size``, ``eod``, ``pad``, ``tokenize``, ``detokenize``), over a HF tokenizer.

    ``pad`` defaults to -1 (never a real id), so GPTDataset's padding logic does not mask real
    tokens; pass ``pad`` to use the tokenizer's pad id instead.
    """

    def __init__(self, name_or_path: str = SAMPLE_TOKENIZER, eod: Optional[int] = None, pad: int = -1):
        from transformers import AutoTokenizer

        self._hf = AutoTokenizer.from_pretrained(name_or_path)
        self.eod = int(self._hf.eos_token_id if eod is None else eod)
        self.pad = pad
        self.vocab_size = len(self._hf)
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [str(name_or_path)]}

    def tokenize(self, text: str) -> List[int]:
        return self._hf.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._hf.backend_tokenizer.decode(list(map(int, np.asarray(ids))), skip_special_tokens=False)

    @property
    def eos(self) -> int:
        return self.eod
