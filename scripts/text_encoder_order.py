"""Does the reference model's text encoder see word order? Swapped two-object captions, token by token.

    python3 scripts/text_encoder_order.py [--model assets/reference/model] [--prior 0 20 50] [--at '[[0,-1],[1,1]]']

A two-object caption and the same caption with the two colours swapped ("a red square ... a blue circle" /
"a blue square ... a red circle"), or with the two motions swapped, hold the same words. If the encoder's output
for a shared word ("square", "moves", "circle") is the same in both, the transformer is given the same multiset of
embeddings for the two captions and cannot tell which object has which colour or motion. Prints that difference
(||e_a - e_b|| / ||e_a|| at the shared words), the mean-pooled cosine, and, with --prior P, the same after
`add_position_prior` (P on the relative-position bias of head 0 at distance -1 and head 1 at +1 in every layer, or
at the (head, distance) pairs of --at, given as JSON; how strong it must be to matter).
"""

import argparse
import json

import torch
from diffusers import WanPipeline

from vgen.models.reference import encode_prompts
from vgen.models.train import add_position_prior

PAIRS = [
    ("a red square moves left while a blue circle grows", "a blue square moves left while a red circle grows"),
    ("a purple square moves down while an orange circle moves up",
     "an orange square moves down while a purple circle moves up"),
    # the motions swapped instead of the colours: which object goes down is told only by words two and more apart
    ("a purple square moves down while an orange circle moves up",
     "a purple square moves up while an orange circle moves down"),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/reference/model")
    parser.add_argument("--prior", type=float, nargs="*", default=[0.0])
    parser.add_argument("--at", type=json.loads, default=[[0, -1], [1, 1]],
                        help="the prior's (head, distance) pairs as JSON (default: [[0,-1],[1,1]])")
    args = parser.parse_args()
    pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    biases = {n: p.detach().clone() for n, p in encoder.named_parameters() if "relative_attention_bias" in n}
    for prior in args.prior:
        with torch.no_grad():
            for name, p in encoder.named_parameters():
                if name in biases:
                    p.copy_(biases[name])
            add_position_prior(encoder, prior, args.at)
            for a, b in PAIRS:
                e = encode_prompts(tokenizer, encoder, [a, b], 64)  # 64 tokens: more than any caption
                words = tokenizer.convert_ids_to_tokens(tokenizer(a)["input_ids"])
                shared = [i for i, (w, v) in enumerate(zip(words, tokenizer.convert_ids_to_tokens(
                    tokenizer(b)["input_ids"]), strict=True)) if w == v]  # fmt: skip
                diffs = {words[i]: round(((e[0, i] - e[1, i]).norm() / e[0, i].norm()).item(), 4) for i in shared}
                n = len(words)
                pooled = torch.nn.functional.cosine_similarity(e[0, :n].mean(0), e[1, :n].mean(0), dim=0).item()
                print(f"prior {prior:g}: {a!r} / {b!r}: pooled cosine {pooled:.6f}; difference at shared words {diffs}")


if __name__ == "__main__":
    main()
