"""Linear probes on a tiny-shapes text encoder: is each object's binding in its token states?

In a two-object caption ("a large green diamond in the center and a medium yellow diamond at the
top on a black background") the U-Net can only draw the first-named object right if some token
state carries that object's colour and shape together with its position. The last token of each
object's phrase ("center", "top") is the first token that can hold all three for that object (in
a causal CLIP text encoder, later tokens can too). This fits a linear probe (multinomial logistic
regression, 80/20 split of the captions) from the state at the end of each phrase to each
object's colour, shape and position, and prints the held-out accuracy beside 1/classes.

For object 1 the test is clean: its phrase end cannot see object 2 (causal), so high scores on
its own attributes mean its binding is there unmixed; the few points above 1/classes on object 2's
come from the dataset drawing the two objects with distinct colours and cells. Object 2's phrase
end sees both objects, and the probes show how much of each it carries.

    python3 tools/probe_text_binding.py --model models/tiny-shapes --captions DIR/captions.jsonl

(`veil dataset --out DIR --seed 1 --count 100000 --side 64` writes the captions.) CPU, under a
minute for 12,000 captions on 2 cores (40 s measured).
"""
import argparse
import json

import torch
from transformers import CLIPTextModel, CLIPTokenizer

COLOURS = {"red", "orange", "yellow", "green", "blue", "purple", "cyan", "white", "black"}
SHAPES = {"circle", "square", "triangle", "diamond"}


def parse(caption):
    """(phrase a, phrase b, attributes) of a two-object caption."""
    a, rest = caption.split(" and ", 1)
    b = rest.rsplit(" on a ", 1)[0]
    attrs = {}
    for key, phrase in (("1", a), ("2", b)):
        words = phrase.split()
        shape = next(w for w in words if w in SHAPES)
        attrs["colour " + key] = next(w for w in words if w in COLOURS)
        attrs["shape " + key] = shape
        attrs["position " + key] = " ".join(words[words.index(shape) + 1:])
    return a, b, attrs


def probe(x, labels, steps=400):
    """Held-out accuracy of a linear probe from x to labels (80/20 split, standardised)."""
    vocab = sorted(set(labels))
    y = torch.tensor([vocab.index(v) for v in labels])
    train = int(len(y) * 0.8)
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], len(vocab), requires_grad=True)
    b = torch.zeros(len(vocab), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        logits = x[:train] @ w + b
        loss = torch.nn.functional.cross_entropy(logits, y[:train]) + 1e-4 * (w ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[train:] @ w + b).argmax(1) == y[train:]).float().mean().item(), 1 / len(vocab)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/tiny-shapes")
    ap.add_argument("--captions", required=True, help="a `veil dataset` captions.jsonl")
    ap.add_argument("--count", type=int, default=12000, help="two-object captions probed")
    args = ap.parse_args()
    tok = CLIPTokenizer.from_pretrained(f"{args.model}/tokenizer")
    text = CLIPTextModel.from_pretrained(f"{args.model}/text_encoder").eval()
    with open(args.captions) as f:
        captions = [json.loads(line)["caption"] for line in f]
    rows = [(c, *parse(c)) for c in captions if " and " in c][:args.count]
    # index of the last token of each phrase (position 0 is the start token)
    ends_a = torch.tensor([len(tok(a).input_ids) - 2 for _, a, _, _ in rows])
    ends_b = torch.tensor([len(tok(a + " and " + b).input_ids) - 2 for _, a, b, _ in rows])
    ids = tok([r[0] for r in rows], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        states = torch.cat([text(ids[i:i + 512]).last_hidden_state
                            for i in range(0, len(rows), 512)])
    every = torch.arange(len(rows))
    print(f"{len(rows)} two-object captions, held-out accuracy of a linear probe "
          "(1/classes in brackets)")
    for name, ends in (("end of object 1's phrase", ends_a), ("end of object 2's phrase", ends_b)):
        x = states[every, ends]
        for what in ("colour 1", "shape 1", "position 1", "colour 2", "shape 2", "position 2"):
            acc, chance = probe(x, [r[3][what] for r in rows])
            print(f"{name} -> {what:10s} {acc * 100:5.1f}%  ({chance * 100:.1f}%)")


if __name__ == "__main__":
    main()
