"""Weighted and long prompts at full SD 1.5 text-encoder size: sdlite against compel and against A1111's encoding.
Run: python benchmarks/prompts.py   (needs `pip install -e .[reference]`, which brings compel; about 5 minutes on 2
shared cores)

A random CLIP ViT-L/14 text tower (SD 1.5's config, benchmarks/checkpoints.randomise) with the real CLIP tokenizer
runs each prompt through compel's Compel (its defaults, and with clip skip 2 = PENULTIMATE_HIDDEN_STATES_NORMALIZED),
through A1111's encoding as tests/fixtures/make_prompts.py rebuilds it from A1111's published code, and through
sdlite's prompts.py with the same weights in fp32. The table gives, per case, the context's length, the largest
and the mean absolute difference, and the reference's own size (max |ref|). Prints the table and writes it to the
"prompts" section of benchmarks/RESULTS.md.
"""
import sys
import tempfile
import types
from pathlib import Path

import torch
from compel import Compel, ReturnedEmbeddingsType
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from sdlite.clip import CLIPTextConfig as Config, CLIPTextModel as Model  # noqa: E402
from sdlite.formats.diffusers import with_text_model_prefix  # noqa: E402
from sdlite.prompts import PromptEncoder  # noqa: E402
from sdlite.tokenizer import Tokenizer  # noqa: E402
from checkpoints import FAMILIES, randomise  # noqa: E402
from make_prompts import a1111_encode  # noqa: E402
from make_text import make_tokenizer_folders  # noqa: E402
from report import machine, table, write_section  # noqa: E402

COMPEL_CASES = [
    ("plain", "a photograph of an astronaut riding a horse"),
    ("word+", "a photograph of an astronaut+ riding a horse"),
    ("word++ / word--", "a photograph of an astronaut++ riding a horse--"),
    ("(words)1.4", "a photograph of (an astronaut)1.4 riding a horse"),
    ("(words)0.5: down-weighted", "a photograph of an astronaut riding (a horse)0.5"),
    ("(words)0: removed", "a photograph of an astronaut riding (a horse)0"),
    ("nested", "a (photograph of (an astronaut)1.3)0.8 riding a horse"),
    ("blend", '("a photograph of an astronaut", "an oil painting of a horse").blend(0.7, 0.3)'),
    ("and", '("a photograph of an astronaut", "an oil painting of a horse").and()'),
    ("and, weighted", '("a photograph of an astronaut", "an oil painting of a horse").and(1, 0.6)'),
    ("long: cut at 75", "masterpiece, best quality, " * 16 + "castle+"),
]
A1111_CASES = [
    ("plain", "a photograph of an astronaut riding a horse"),
    ("(word) ((word)) [word]", "a (photograph) of ((an astronaut)) riding [a horse]"),
    ("(word:1.3), nested", "a (photograph of (an astronaut:1.3):0.9) riding a horse"),
    ("escapes", r"a photograph \(of\) an astronaut riding a horse"),
    ("BREAK", "a photograph of an astronaut BREAK riding a horse"),
    ("long: 2 windows", "a big " + "masterpiece, best quality, (castle:1.2), " * 12 + "sunset"),
    ("long: 3 windows", "masterpiece, (best quality), " * 40),
]


def differences(got: torch.Tensor, ref: torch.Tensor) -> list:
    d = (got - ref).abs()
    return [ref.shape[1], f"{d.max().item():.2e}", f"{d.mean().item():.2e}", f"{ref.abs().max().item():.2f}"]


@torch.no_grad()
def main():
    torch.manual_seed(0)
    spec = FAMILIES["sd1"]["text"]
    reference = CLIPTextModel(CLIPTextConfig(**spec)).eval()
    randomise(reference, 1)
    # compel's clip skip reads text_encoder.text_model.final_layer_norm, a name transformers 5 no longer has
    reference.text_model = types.SimpleNamespace(final_layer_norm=reference.final_layer_norm)
    config = Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    hidden_act="quick_gelu")
    model = Model(config)
    model.load_state_dict(with_text_model_prefix(reference.state_dict()), strict=True)
    model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tokenizer_folders(Path(tmp))["sd1"]
        ref_tokenizer, tokenizer = CLIPTokenizer.from_pretrained(folder), Tokenizer.from_folder(folder)
        for skip in (1, 2):
            returned = (ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED if skip == 1
                        else ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED)
            compel = Compel(tokenizer=ref_tokenizer, text_encoder=reference, returned_embeddings_type=returned)
            ours = PromptEncoder(tokenizer, model, "compel", clip_skip=skip)
            for name, prompt in COMPEL_CASES:
                rows.append([f"compel, clip skip {skip}", name, *differences(ours(prompt), compel(prompt))])
        for skip in (1, 2):
            ours = PromptEncoder(tokenizer, model, "a1111", clip_skip=skip)
            for name, prompt in A1111_CASES:
                ref = a1111_encode(ref_tokenizer, reference, prompt, clip_skip=skip)
                rows.append([f"a1111, clip skip {skip}", name, *differences(ours(prompt), ref)])
    text = (f"## Prompts\n\n{machine()}\n\nSD 1.5's text encoder (random weights), fp32: sdlite's context against "
            "compel's own (`Compel`, its defaults) and against A1111's encoding rebuilt from its published code "
            "(tests/fixtures/make_prompts.py). Written by `python benchmarks/prompts.py`.\n\n"
            + table(["syntax", "case", "tokens", "max abs diff", "mean abs diff", "max abs ref"], rows))
    print(text)
    write_section("prompts", text)


if __name__ == "__main__":
    main()
