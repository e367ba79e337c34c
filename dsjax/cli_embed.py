"""`dsjax embed`: embeddings and pooled outputs of an encoder checkpoint (BERT, DistilBERT, CLIP).

Every check that needs only the arguments and the model's config runs before any weight is
read; errors are raised as exceptions, which dsjax.cli.main prints as one line.
"""

from __future__ import annotations

from pathlib import Path

DTYPES = ("bf16", "fp16", "fp32")


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="embeddings / pooled outputs of an encoder (BERT, DistilBERT, CLIP)",
                       description="Runs an encoder checkpoint on texts (tokenized with the "
                       "checkpoint's tokenizer) and, for CLIP, images; prints each input's pooled "
                       "vector and its head's outputs (classification logits, MLM argmax tokens, "
                       "CLIP image-text logits).")
    p.add_argument("--model", required=True, help="HF directory or dsjax checkpoint of an encoder")
    p.add_argument("--text", action="append", default=[], help="input text; repeat for a batch")
    p.add_argument("--image", action="append", default=[],
                   help="CLIP: a .npy file of pixel values [3, S, S] or [B, 3, S, S], normalized as "
                   "the checkpoint's image processor does; repeat for more")
    p.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto",
                   help="which vector to print: the model's pooler_output, the first token's hidden "
                   "state, or the mean over real tokens; auto (default): CLIP's projected embeds, "
                   "else the pooler, else the mean")
    p.add_argument("--show", type=int, default=8, help="values printed per vector (0: all; default 8)")
    p.add_argument("--save", help="write the vectors (and CLIP logits) to this .npz file")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="compute dtype (default fp32)")


def check_request(args):
    """The inputs, the --save path and the model's kind, before any weight is read; returns the
    model's opened source."""
    from dsjax.checkpoint import writable_dir
    from dsjax.sources import open_source

    if not args.text and not args.image:
        raise ValueError("give at least one --text or --image")
    if args.save:
        if Path(args.save).is_dir():
            raise IsADirectoryError(f"--save {args.save} is a directory; name a .npz file")
        writable_dir(Path(args.save).absolute().parent)
    source = open_source(args.model)
    cfg = source.config
    if cfg.encoder is None:
        raise ValueError(f"{args.model} is a {cfg.family} decoder; use dsjax generate")
    if args.text and cfg.takes_images:
        raise ValueError(f"{args.model} is an image tower only; pass --image, not --text")
    if args.image and not (cfg.takes_images or cfg.encoder.vision):
        raise ValueError(f"{args.model} ({cfg.family}) has no image tower; drop --image")
    return source


def embed(args) -> int:
    import numpy as np

    import dsjax

    source = check_request(args)
    pixels = np.concatenate([_load_pixels(f) for f in args.image]) if args.image else None
    engine = dsjax.init_inference(source, dtype=args.dtype, progress=not args.quiet)
    saved = _embed_inputs(args, engine, pixels)
    if args.save:
        np.savez(args.save, **{k: np.asarray(v) for k, v in saved.items()})
        print(f"wrote {args.save} ({', '.join(saved)})")
    return 0


def _embed_inputs(args, engine, pixels) -> dict:
    """Runs and prints the texts, images and CLIP logits; returns the arrays for --save."""
    import numpy as np

    saved = {}
    if args.text:
        tok = engine.tokenizer
        encs = [tok(t) if callable(tok) else {"input_ids": tok.encode(t)} for t in args.text]
        ids = [list(e["input_ids"]) for e in encs]
        types = ([list(e["token_type_ids"]) for e in encs]
                 if engine.config.type_vocab_size and all("token_type_ids" in e for e in encs) else None)
        out = engine.embed(ids, token_type_ids=types)
        text_vecs, how = _pick_vector(out, args.pooling)
        D = out.last_hidden_state.shape[-1]
        for i, text in enumerate(args.text):
            print(f"[{i}] {text!r}: hidden [{len(ids[i])}, {D}]; {how} {_vector(text_vecs[i], args.show)}")
            _print_head(engine, tok, out, i, len(ids[i]))
        saved["text"] = text_vecs
    if pixels is not None:
        out = engine.embed_image(pixels)
        image_vecs, how = _pick_vector(out, args.pooling)
        T, D = out.last_hidden_state.shape[1:]
        for i in range(len(pixels)):
            print(f"[image {i}] hidden [{T}, {D}]; {how} {_vector(image_vecs[i], args.show)}")
        saved["image"] = image_vecs
    if args.text and args.image and engine.config.encoder.vision is not None:
        logits = np.asarray(engine.clip_logits(ids, pixels).logits_per_image)  # [images, texts]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        print("logits_per_image (rows: images, columns: texts; softmax over texts):")
        for i, (row, p) in enumerate(zip(logits, probs)):
            print(f"  [image {i}] " + " ".join(f"{x:.4f}" for x in row) + "  probs "
                  + " ".join(f"{x:.3f}" for x in p))
        saved["logits_per_image"] = logits
    return saved


def _pick_vector(out, pooling: str):
    """(vectors [B, X], label) for --pooling."""
    if pooling == "auto":
        pooling = ("embeds" if out.embeds is not None else
                   "pooler" if out.pooler_output is not None else "mean")
    if pooling == "embeds":
        return out.embeds, "projected embeds"
    if pooling == "pooler":
        if out.pooler_output is None:
            raise ValueError("this model has no pooler; use --pooling cls or mean")
        return out.pooler_output, "pooler_output"
    if pooling == "cls":
        return out.last_hidden_state[:, 0], "first-token hidden state"
    return out.mean_pooled(), "mean of hidden states"


def _vector(v, show: int) -> str:
    import numpy as np

    v = np.asarray(v)
    shown = v if show <= 0 else v[:show]
    more = " ..." if len(shown) < len(v) else ""
    return (f"[{len(v)}] norm {np.linalg.norm(v):.4f}: "
            + " ".join(f"{x:.4f}" for x in shown) + more)


def _print_head(engine, tok, out, i: int, n: int) -> None:
    import numpy as np

    head = engine.config.encoder.head
    if head == "classifier":
        logits = np.asarray(out.logits[i])
        print(f"    classifier logits: {' '.join(f'{x:.4f}' for x in logits)} "
              f"(argmax {int(logits.argmax())})")
    elif head == "mlm":
        best = np.asarray(out.logits[i, :n]).argmax(-1)
        print(f"    mlm argmax per token: {' '.join(tok.decode([int(t)]) for t in best)}")


def _load_pixels(path: str):
    import numpy as np

    x = np.load(path, allow_pickle=False)
    if not isinstance(x, np.ndarray) or x.ndim not in (3, 4):
        shape = getattr(x, "shape", "an .npz archive")
        raise ValueError(f"{path} holds {shape}; expected an array [3, S, S] or [B, 3, S, S]")
    return x[None] if x.ndim == 3 else x
