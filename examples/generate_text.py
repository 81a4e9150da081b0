"""Sample a continuation from the character-level language model trained by ``bpc train``.

    python examples/generate_text.py char_transformer_params.npz --prompt "Return the " \\
        [--chars 300] [--temperature 0.8] [--seed 0] [--module generated/char_transformer.py]

Needs only numpy: the model is the generated module (``generated/char_transformer.py``, what
``bpc compile examples/char_transformer.toml`` writes), the parameters are the ``--out`` file
of ``bpc train``. Each step feeds the last ``T`` (64) characters to ``forward`` and draws the
next one from the probabilities at the last filled position, sharpened by the temperature.
A shorter text is padded at the end: the attention is causal, so the positions after it do not
change the prediction at its last character.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "generated" / "char_transformer.py"


def encode(text):
    """ids of ``text`` as examples/make_text_data.py numbers them: newline 0, ' '..'~' 1..95."""
    return [0 if c == "\n" else ord(c) - 31 for c in text]


def decode(ids):
    return "".join("\n" if i == 0 else chr(int(i) + 31) for i in ids)


def load_module(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate(module, params, prompt, chars=300, temperature=0.8, seed=0):
    """``prompt`` followed by ``chars`` sampled characters."""
    (name, (T,)), = module.INPUTS.items()
    vocab = module.VOCAB[name]
    rng = np.random.default_rng(seed)
    ids = encode(prompt) or [0]
    window = np.zeros((1, T), dtype=np.int64)
    for _ in range(chars):
        context = ids[-T:]
        window[0, :len(context)] = context
        p = np.asarray(module.forward(params, window)[0, len(context) - 1], dtype=np.float64)
        if temperature != 1.0:
            logits = np.log(np.maximum(p, 1e-30)) / temperature
            p = np.exp(logits - logits.max())
        p /= p.sum()
        ids.append(int(rng.choice(vocab, p=p)))
    return decode(ids)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", type=Path, help="the parameters written by bpc train --out")
    ap.add_argument("--prompt", default="Return the ", help="the text to continue (printable ASCII)")
    ap.add_argument("--chars", type=int, default=300, help="how many characters to sample")
    ap.add_argument("--temperature", type=float, default=0.8, help="below 1: more likely characters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--module", type=Path, default=MODULE, help="the generated module of the model")
    args = ap.parse_args(argv)
    if any(not (c == "\n" or " " <= c <= "~") for c in args.prompt):
        ap.error("--prompt: only printable ASCII characters and newlines are in the vocabulary")
    if args.chars < 0 or not args.temperature > 0:
        ap.error("--chars must be >= 0 and --temperature > 0")
    module = load_module(args.module)
    with np.load(args.params) as f:
        params = {k: f[k] for k in module.PARAMS}
    print(generate(module, params, args.prompt, args.chars, args.temperature, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
