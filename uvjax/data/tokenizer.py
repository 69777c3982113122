"""Text tokenizer and conversation templates.

One interface (:class:`TextTokenizer`) over an HF ``tokenizers.Tokenizer``, whatever its origin:

- trained here as a byte-level BPE on the synthetic corpus (:func:`train_bpe`, cached by directory
  with :func:`load_or_train`);
- an HF tokenizer directory (``tokenizer.json`` + optional ``tokenizer_config.json``,
  :meth:`TextTokenizer.from_hf_dir`);
- other formats (GGUF ...) through :func:`register_loader`: a loader builds a ``tokenizers.Tokenizer``
  and calls :meth:`TextTokenizer.from_tokenizers`; :func:`load_tokenizer` dispatches by kind.

Special tokens are addressed by *name* (pad, bos, eos, boi, eoi, im_start, im_end); a base tokenizer
lacking ``<boi>``/``<eoi>`` or the ChatML role markers gets them appended (``vocab_size`` grows and the
model's embedding must follow). ``encode`` refuses text containing any special-token string unless
the caller says the text is trusted template text, so data can never inject a control token.

Templates turn a :class:`~uvjax.data.records.Record` into ordered :class:`Piece` s (text, special token
or image) tagged with the role and whether they are loss targets; ``data/sequence.py`` tokenises them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from uvjax.data.records import Record, Segment
from uvjax.integrity_files import DamagedFile, read_json

SPECIAL_NAMES = ("pad", "bos", "eos", "boi", "eoi", "im_start", "im_end")
DEFAULT_SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "boi": "<boi>", "eoi": "<eoi>",
                    "im_start": "<|im_start|>", "im_end": "<|im_end|>"}
IMAGE_PLACEHOLDER = "<image>"  # LLaVA-style placeholder: never valid inside record text
_META_FILE = "uvjax_tokenizer.json"


class TextTokenizer:
    """``encode(text) -> ids``, ``decode(ids) -> str``, ``vocab_size`` and named special ids."""

    def __init__(self, tok: tokenizers.Tokenizer, specials: dict[str, str], source: str = "bpe"):
        missing = [n for n in SPECIAL_NAMES if n not in specials]
        if missing:
            raise ValueError(f"special tokens {missing} not given; need all of {SPECIAL_NAMES}")
        self.tok = tok
        self.source = source
        self.specials = dict(specials)
        absent = [s for s in dict.fromkeys(self.specials.values()) if tok.token_to_id(s) is None]
        if absent:
            tok.add_special_tokens(absent)
        self.ids = {n: int(tok.token_to_id(s)) for n, s in self.specials.items()}
        # Every added/special token string of the base tokenizer is forbidden in untrusted text.
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        self.forbidden = tuple(sorted(added | set(self.specials.values()) | {IMAGE_PLACEHOLDER},
                                      key=len, reverse=True))

    # -- ids
    pad_id = property(lambda self: self.ids["pad"])
    bos_id = property(lambda self: self.ids["bos"])
    eos_id = property(lambda self: self.ids["eos"])
    boi_id = property(lambda self: self.ids["boi"])
    eoi_id = property(lambda self: self.ids["eoi"])
    im_start_id = property(lambda self: self.ids["im_start"])
    im_end_id = property(lambda self: self.ids["im_end"])

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def special_id(self, name: str) -> int:
        if name not in self.ids:
            raise ValueError(f"unknown special token name {name!r}; expected one of {SPECIAL_NAMES}")
        return self.ids[name]

    def find_special(self, text: str) -> str | None:
        """The first special-token string found in ``text`` (None when clean)."""
        for s in self.forbidden:
            if s in text:
                return s
        return None

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no bos/eos added). Untrusted text with a special-token string
        raises ValueError: record text must not smuggle control tokens."""
        if not allow_special:
            bad = self.find_special(text)
            if bad is not None:
                raise ValueError(f"text contains the special-token string {bad!r}, which is not "
                                 f"allowed in data text: {text[:80]!r}")
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # -- persistence
    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, _META_FILE), "w") as f:
            json.dump({"specials": self.specials, "source": self.source}, f, indent=1)
        return directory

    @classmethod
    def load(cls, directory: str) -> "TextTokenizer":
        """Loads what :meth:`save` wrote (or, without our meta file, an HF directory)."""
        meta = os.path.join(directory, _META_FILE)
        if not os.path.exists(meta):
            return cls.from_hf_dir(directory)
        todo = (f"When {directory} is a stage of the cache, move it aside (mv {directory} {directory}.damaged) "
                "and rerun: the stage is rebuilt; else restore the file from a copy")
        m = read_json(meta, "tokenizer meta file", todo)
        if not isinstance(m, dict) or not isinstance(m.get("specials"), dict):
            raise DamagedFile(f"{meta}: damaged tokenizer meta file: no 'specials' object. {todo}")
        tok = _tokenizer_file(os.path.join(directory, "tokenizer.json"), todo)
        return cls(tok, m["specials"], m.get("source", "bpe"))

    @classmethod
    def from_tokenizers(cls, tok: tokenizers.Tokenizer, *, bos: str, eos: str, pad: str | None = None,
                        boi: str = "<boi>", eoi: str = "<eoi>", im_start: str = "<|im_start|>",
                        im_end: str = "<|im_end|>", source: str = "external") -> "TextTokenizer":
        """The extension point for other formats: wrap any HF ``tokenizers.Tokenizer``.
        ``pad`` defaults to ``eos`` (the usual choice for base models without a pad token)."""
        return cls(tok, {"pad": pad or eos, "bos": bos, "eos": eos, "boi": boi, "eoi": eoi,
                         "im_start": im_start, "im_end": im_end}, source)

    @classmethod
    def from_hf_dir(cls, directory: str, **overrides: str) -> "TextTokenizer":
        """An HF tokenizer directory: ``tokenizer.json`` plus bos/eos/pad from ``tokenizer_config.json``
        or ``special_tokens_map.json`` (``overrides`` win)."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            raise ValueError(f"{directory!r} has no tokenizer.json (HF fast tokenizer expected)")
        tok = _tokenizer_file(path, "restore it from the model's files")
        cfg: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = os.path.join(directory, name)
            if os.path.exists(p):
                cfg.update(read_json(p, "HF tokenizer file", "restore it from the model's files"))

        def tok_str(key):
            v = overrides.get(key[:-6]) or cfg.get(key)
            return v.get("content") if isinstance(v, dict) else v

        bos, eos, pad = tok_str("bos_token"), tok_str("eos_token"), tok_str("pad_token")
        if not eos:
            raise ValueError(f"{directory!r}: no eos_token in tokenizer_config.json; pass eos=...")
        kw = {k: overrides[k] for k in ("boi", "eoi", "im_start", "im_end") if k in overrides}
        return cls.from_tokenizers(tok, bos=bos or eos, eos=eos, pad=pad, source=f"hf:{directory}",
                                   **kw)


def train_bpe(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> TextTokenizer:
    """A byte-level BPE (any byte sequence encodes; no unknown token) with our specials at ids 0..6."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [DEFAULT_SPECIALS[n] for n in SPECIAL_NAMES]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, dict(DEFAULT_SPECIALS), "bpe")


def _tokenizer_file(path: str, todo: str) -> tokenizers.Tokenizer:
    """``Tokenizer.from_file``, whose errors (a bare "expected value at line 1 column ...") name the file."""
    try:
        return tokenizers.Tokenizer.from_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises plain Exception)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file") from e
        raise DamagedFile(f"{path}: damaged tokenizer file: {e}. {todo}") from e


def load_or_train(directory: str, texts: Callable[[], Iterable[str]], vocab_size: int = 1024) -> TextTokenizer:
    """Cached by path: loads ``directory`` when it holds a tokenizer, else trains and saves there."""
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return TextTokenizer.load(directory)
    t = train_bpe(texts(), vocab_size)
    tmp = directory.rstrip("/") + f".tmp{os.getpid()}"
    t.save(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    try:
        os.replace(tmp, directory)  # atomic: a concurrent reader never sees half a tokenizer
    except OSError:
        pass  # another process won the race; its tokenizer is identical in content
    return TextTokenizer.load(directory)


# ============================================================================ image codes as vocabulary rows
# Chameleon/Anole name code c ``IMGIMG<digits of c, 0-9 written A-J>Z`` (code 123: ``IMGIMGBCDZ``); the
# names, not the ids, define which row is which code (reference §A.3), so the map is always read back.
IMAGE_TOKEN_PREFIX, IMAGE_TOKEN_SUFFIX = "IMGIMG", "Z"


def image_token_name(code: int) -> str:
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + IMAGE_TOKEN_SUFFIX


def image_token_code(name: str) -> int | None:
    """The code a vocabulary entry stands for, or None when ``name`` is not an image token."""
    if not (name.startswith(IMAGE_TOKEN_PREFIX) and name.endswith(IMAGE_TOKEN_SUFFIX)):
        return None
    body = name[len(IMAGE_TOKEN_PREFIX):-len(IMAGE_TOKEN_SUFFIX)]
    if not body or any(not "A" <= ch <= "J" for ch in body):
        return None
    return int("".join(str(ord(ch) - ord("A")) for ch in body))


def image_code_ids(tokenizer: "TextTokenizer", num_codes: int) -> tuple[int, ...]:
    """Vocabulary id of each code 0..num_codes-1, read from the tokenizer's image-token names. Raises,
    naming what is missing, unless the vocabulary holds exactly one entry for each of those codes."""
    found: dict[int, int] = {}
    for name, i in tokenizer.tok.get_vocab(with_added_tokens=True).items():
        c = image_token_code(name)
        if c is not None:
            if c in found:
                raise ValueError(f"tokenizer ({tokenizer.source}): two vocabulary entries for image code {c}")
            found[c] = int(i)
    missing = [c for c in range(num_codes) if c not in found]
    extra = sorted(c for c in found if c >= num_codes)
    if missing or extra:
        raise ValueError(
            f"tokenizer ({tokenizer.source}) has image tokens for {len(found)} codes; model.image.num_codes="
            f"{num_codes} needs codes 0..{num_codes - 1}: missing {missing[:5]}{'…' if len(missing) > 5 else ''}"
            f"{f', beyond the codebook {extra[:5]}' if extra else ''}")
    return tuple(found[c] for c in range(num_codes))


def with_image_tokens(tokenizer: "TextTokenizer", num_codes: int) -> "TextTokenizer":
    """The tokenizer with one special token per VQ code (Chameleon's names), appended after its vocabulary
    when it has none (a tokenizer trained here); unchanged when it already has them (Chameleon/Anole).
    Special tokens: text can never produce them, and record text that contains one is refused."""
    names = {image_token_code(n) for n in tokenizer.tok.get_vocab(with_added_tokens=True)} - {None}
    if names:
        image_code_ids(tokenizer, num_codes)  # complete and consistent, or a clear error
        return tokenizer
    tok = tokenizers.Tokenizer.from_str(tokenizer.tok.to_str())
    tok.add_special_tokens([image_token_name(c) for c in range(num_codes)])
    return TextTokenizer(tok, tokenizer.specials, tokenizer.source)


_LOADERS: dict[str, Callable[..., TextTokenizer]] = {}


def register_loader(kind: str, fn: Callable[..., TextTokenizer]) -> None:
    """Adds a tokenizer source, e.g. ``register_loader("gguf", load_gguf_tokenizer)``."""
    _LOADERS[kind] = fn


def load_tokenizer(kind: str, path: str, **kw) -> TextTokenizer:
    """``kind``: ``uvjax`` (saved here), ``hf`` (tokenizer.json dir) or a registered loader."""
    if kind not in _LOADERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {sorted(_LOADERS)}")
    return _LOADERS[kind](path, **kw)


register_loader("uvjax", lambda path, **kw: TextTokenizer.load(path))
register_loader("hf", TextTokenizer.from_hf_dir)


# ============================================================================ conversation templates
@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of a templated conversation.

    kind ``text`` (``text`` is tokenised; ``trusted`` text may contain special-token strings),
    ``special`` (``text`` is a special name such as ``eos``) or ``image`` (``segment``).
    ``target``: whether the piece's text tokens are loss targets (assistant output).
    """
    role: str
    kind: str
    text: str | None = None
    segment: Segment | None = None
    trusted: bool = False
    target: bool = False


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CHATML_SYSTEM = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Vicuna v1 (``USER: q ASSISTANT: a</s>``) or ChatML (``<|im_start|>role\\n...<|im_end|>\\n``).

    Within a turn, content pieces are joined by ``\\n`` (attached to the text side); Vicuna puts a
    space between the role label and the content (kept with the content, so BPE sees `` word``).
    Only assistant content and the assistant's end token (``</s>`` / ``<|im_end|>``) are targets.
    """
    name: str
    system: str

    def turns(self, record: Record) -> list[tuple[str, list[Segment]]]:
        out: list[tuple[str, list[Segment]]] = []
        for s in record.segments:
            if out and out[-1][0] == s.role:
                out[-1][1].append(s)
            else:
                out.append((s.role, [s]))
        return out

    def _content(self, role: str, segs: list[Segment], lead: str) -> list[Piece]:
        target = role == "assistant"
        pieces: list[Piece] = []
        for i, s in enumerate(segs):
            if s.kind == "image":
                if i > 0 and segs[i - 1].kind == "image":
                    pieces.append(Piece(role, "text", "\n", trusted=True, target=target))
                pieces.append(Piece(role, "image", segment=s, target=target))
                continue
            text = s.text or ""
            if i > 0 and segs[i - 1].kind == "image":
                text = "\n" + text
            if i + 1 < len(segs):
                text = text + "\n"
            pieces.append(Piece(role, "text", text, target=target))
        if lead:
            if pieces and pieces[0].kind == "text":
                pieces[0] = dataclasses.replace(pieces[0], text=lead + pieces[0].text)
            else:
                pieces.insert(0, Piece(role, "text", lead, trusted=True, target=target))
        return pieces

    def pieces(self, record: Record, *, add_generation_prompt: bool = False) -> list[Piece]:
        """The whole conversation; with ``add_generation_prompt`` it ends with the assistant's
        opening (for inference), and the record should end with a user turn."""
        turns = self.turns(record)
        system = self.system
        if turns and turns[0][0] == "system":
            system = "".join(s.text or "" for s in turns[0][1] if s.kind == "text")
            if any(s.kind == "image" for s in turns[0][1]):
                raise ValueError(f"record {record.id!r}: images are not allowed in the system turn")
            turns = turns[1:]
        for role, _ in turns:
            if role == "system":
                raise ValueError(f"record {record.id!r}: a system turn is only allowed first")
        out: list[Piece] = []
        if self.name == "vicuna_v1":
            out.append(Piece("system", "special", "bos"))
            if system:
                out += [Piece("system", "text", system), Piece("system", "text", " ", trusted=True)]
            for role, segs in turns:
                label = "USER:" if role == "user" else "ASSISTANT:"
                out.append(Piece(role, "text", label, trusted=True))
                out += self._content(role, segs, " ")
                if role == "user":
                    out.append(Piece(role, "text", " ", trusted=True))
                else:
                    out.append(Piece(role, "special", "eos", target=True))
            if add_generation_prompt:
                out.append(Piece("assistant", "text", "ASSISTANT:", trusted=True))
        elif self.name == "chatml":
            blocks = ([("system", [Segment("system", "text", text=system)])] if system else []) + turns
            for role, segs in blocks:
                out += [Piece(role, "special", "im_start"), Piece(role, "text", f"{role}\n", trusted=True)]
                out += self._content(role, segs, "")
                out += [Piece(role, "special", "im_end", target=role == "assistant"),
                        Piece(role, "text", "\n", trusted=True)]
            if add_generation_prompt:
                out += [Piece("assistant", "special", "im_start"),
                        Piece("assistant", "text", "assistant\n", trusted=True)]
        else:
            raise ValueError(f"unknown template {self.name!r}; expected one of {sorted(TEMPLATES)}")
        return out


TEMPLATES = {"vicuna_v1": VICUNA_SYSTEM, "chatml": CHATML_SYSTEM}


def get_template(name: str, system: str | None = None) -> ChatTemplate:
    """``system=None`` keeps the template's default system prompt; ``""`` drops it."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; expected one of {sorted(TEMPLATES)}")
    return ChatTemplate(name, TEMPLATES[name] if system is None else system)


def template_texts() -> list[str]:
    """Fixed template strings, added to a BPE corpus so role labels become few tokens."""
    return [VICUNA_SYSTEM, CHATML_SYSTEM, "USER:", "ASSISTANT:", " USER: ASSISTANT: ",
            "system\n", "user\n", "assistant\n"]
