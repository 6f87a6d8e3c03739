"""Prompt syntaxes (sdlite/prompts.py): A1111's and compel's parsing checked by hand, A1111's chunking of long prompts,
and the contexts against compel's own output and against A1111's encoding rebuilt from its published behaviour
(tests/fixtures/make_prompts.py, prompts.safetensors)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdlite.clip import CLIPTextConfig, CLIPTextModel
from sdlite.errors import UserError
from sdlite.formats.diffusers import with_text_model_prefix
from sdlite.formats.families import SD2
from sdlite.prompts import (PromptEncoder, chunk_a1111, compel_fragments, describe, emphasis, encode_prompts,
                            parse_a1111, parse_compel)
from sdlite.tokenizer import Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "prompts.safetensors"
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_vendored()


def ids_of(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.tokens([text])[0]


# --- A1111 parsing, by hand ---------------------------------------------------------------------------------------

def test_a1111_brackets():
    assert parse_a1111("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_a1111("[less]") == [("less", 1 / 1.1)]
    assert parse_a1111("(a:1.3)") == [("a", 1.3)]
    assert parse_a1111("( a : 0.5 )") == [(" a ", 0.5)]    # spaces around the number are allowed
    (text, weight), = parse_a1111("((twice))")
    assert text == "twice" and weight == pytest.approx(1.21, rel=1e-15)
    (text, weight), = parse_a1111("[[twice]]")
    assert text == "twice" and weight == pytest.approx(1 / 1.21, rel=1e-15)


def test_a1111_nesting_multiplies():
    pieces = parse_a1111("(a (b:1.5) [c]:0.5) d")
    assert [t for t, _ in pieces] == ["a ", "b", " ", "c", " d"]
    assert [w for _, w in pieces] == pytest.approx([0.5, 0.75, 0.5, 0.5 / 1.1, 1.0], rel=1e-15)


def test_a1111_escapes_and_unbalanced_brackets():
    assert parse_a1111(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_a1111(r"a \\ b") == [("a \\ b", 1.0)]
    assert parse_a1111("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_a1111("stray) close]") == [("stray) close]", 1.0)]
    assert parse_a1111("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]   # equal neighbours merged
    assert parse_a1111("time: 5pm") == [("time: 5pm", 1.0)]                       # a colon outside brackets is text
    assert parse_a1111("") == [("", 1.0)]


def test_a1111_break():
    assert parse_a1111("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_a1111("BREAKFAST") == [("BREAKFAST", 1.0)]                        # a whole word only


# --- A1111 chunking, by hand --------------------------------------------------------------------------------------

def test_short_prompt_is_one_window_with_its_weights(tokenizer):
    chunks = chunk_a1111(tokenizer, parse_a1111("a (red:1.5) [cat]"))
    a, red, cat = (ids_of(tokenizer, w)[0] for w in ("a", "red", "cat"))
    assert chunks.ids.shape == (1, 77) and chunks.token_count == 3
    assert chunks.ids[0, :5].tolist() == [BOS, a, red, cat, EOS]
    assert (chunks.ids[0, 5:] == EOS).all()   # SD 1.x pads with the end token
    assert chunks.weights[0, :5].tolist() == pytest.approx([1, 1, 1.5, 1 / 1.1, 1])
    assert (chunks.weights[0, 5:] == 1).all()


def test_sd2_pads_after_the_first_end_token():
    chunks = chunk_a1111(Tokenizer.from_vendored(SD2.pad_id), parse_a1111("a cat"))
    assert chunks.ids[0, 3] == EOS and (chunks.ids[0, 4:] == 0).all()


def test_75_tokens_fill_one_window_76_make_two(tokenizer):
    a = ids_of(tokenizer, "a")[0]
    one = chunk_a1111(tokenizer, parse_a1111("a " * 75))
    assert one.ids.shape == (1, 77) and (one.ids[0, 1:76] == a).all() and one.ids[0, 76] == EOS
    two = chunk_a1111(tokenizer, parse_a1111("a " * 76))
    assert two.ids.shape == (2, 77) and two.token_count == 76
    assert two.ids[1, :3].tolist() == [BOS, a, EOS]


def test_boundary_moves_back_to_a_comma_within_20_tokens(tokenizer):
    """60 a, a comma, 20 b: when the 76th token comes, the comma is 15 tokens back, so the first window ends with it
    and the 14 b after it move to the second window, before the other 6."""
    a, comma, b = (ids_of(tokenizer, w)[0] for w in ("a", ",", "b"))
    chunks = chunk_a1111(tokenizer, parse_a1111("a " * 60 + ", " + "b " * 20))
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[0, 1:63].tolist() == [a] * 60 + [comma, EOS]
    assert chunks.ids[1, :22].tolist() == [BOS] + [b] * 20 + [EOS]
    assert chunks.token_count == 75 + 20


def test_no_comma_within_20_tokens_cuts_at_75(tokenizer):
    a, comma, b = (ids_of(tokenizer, w)[0] for w in ("a", ",", "b"))
    chunks = chunk_a1111(tokenizer, parse_a1111("a " * 50 + ", " + "b " * 30))   # the comma 25 tokens back
    assert chunks.ids[0, 1:77].tolist() == [a] * 50 + [comma] + [b] * 24 + [EOS]
    assert chunks.ids[1, :8].tolist() == [BOS] + [b] * 6 + [EOS]


def test_break_starts_a_new_window_and_weights_follow_tokens(tokenizer):
    a, cat, dog = (ids_of(tokenizer, w)[0] for w in ("a", "cat", "dog"))
    chunks = chunk_a1111(tokenizer, parse_a1111("a cat BREAK a (dog:1.2)"))
    assert chunks.ids.shape == (2, 77) and chunks.token_count == 75 + 2
    assert chunks.ids[0, :4].tolist() == [BOS, a, cat, EOS]
    assert chunks.ids[1, :4].tolist() == [BOS, a, dog, EOS]
    assert chunks.weights[1, :4].tolist() == pytest.approx([1, 1, 1.2, 1])


def test_emphasis_keeps_the_mean_and_scales_rows():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 77, 8, generator=g, dtype=torch.float64) + 0.5
    w = torch.ones(1, 77, dtype=torch.float64)
    w[0, 3], w[0, 5] = 1.5, 0.5
    out = emphasis(z, w)
    torch.testing.assert_close(out.mean(), z.mean(), rtol=1e-12, atol=0)   # fp64: rounding only
    ratio = out / z                                                          # one common factor c, times w
    torch.testing.assert_close(ratio[0, 3] / ratio[0, 0], torch.full((8,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(ratio[0, 5] / ratio[0, 0], torch.full((8,), 0.5, dtype=torch.float64))


# --- compel parsing: what compel's own parser gives (compel 2.5.1's Compel.parse_prompt_string) ----------------

@pytest.mark.parametrize("prompt, expected", [
    ("a cat+ on a mat", [("a", 1.0), ("cat", 1.1), ("on a mat", 1.0)]),
    ("a (red ball)1.4 here", [("a", 1.0), ("red ball", 1.4), ("here", 1.0)]),
    ("a ball++ and a cat-- ok", [("a", 1.0), ("ball", 1.21), ("and a", 1.0), ("cat", 0.81), ("ok", 1.0)]),
    ("(a ball)+++", [("a ball", 1.331)]),
    ('a "quoted words"+ ok', [("a", 1.0), ("quoted words", 1.1), ("ok", 1.0)]),
    ("a (nested (words)1.2)0.5 end", [("a", 1.0), ("nested", 0.5), ("words", 0.6), ("end", 1.0)]),
    ("a ball+ dog-", [("a", 1.0), ("ball", 1.1), ("dog", 0.9)]),
    ("masterpiece, best quality, city", [("masterpiece, best quality, city", 1.0)]),
    ("a, b+, c", [("a,", 1.0), ("b", 1.1), (", c", 1.0)]),           # punctuation ends a word
    ("well-known cat+", [("well-known", 1.0), ("cat", 1.1)]),
    ("cat+-", [("cat", 1.1), ("-", 1.0)]),
    ("a) b+", [("a)", 1.0), ("b", 1.1)]),                              # a stray bracket is text
    ("(a b", [("(a b", 1.0)]),
])
def test_compel_fragments(prompt, expected):
    got = compel_fragments(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_compel_blend_and_and():
    blend = parse_compel('("a red cat", "a blue dog").blend(0.7, 0.3)')
    assert blend.op == "blend" and blend.weights == (0.7, 0.3)
    assert blend.prompts == [[("a red cat", 1.0)], [("a blue dog", 1.0)]]
    joined = parse_compel('("a red cat", "a blue dog").and()')
    assert joined.op == "and" and joined.weights == (1.0, 1.0)
    with pytest.raises(UserError, match="2 prompts but 3 weights"):
        parse_compel('("a", "b").blend(1, 2, 3)')


# --- contexts against the references ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    with safe_open(FIXTURE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return tensors, {k: json.loads(v) for k, v in meta.items()}


@pytest.fixture(scope="module")
def encoder_model(reference) -> CLIPTextModel:
    """make_prompts.py's text model: stored weights, the token embedding zero but for the stored rows."""
    tensors, meta = reference
    config = CLIPTextConfig.from_json(meta["config"])
    sd = with_text_model_prefix({k: v.float() for k, v in tensors.items() if "/" not in k and "used" not in k})
    embedding = torch.zeros(config.vocab_size, config.hidden_size)
    embedding[tensors["used_ids"]] = tensors["used_rows"].float()
    sd["text_model.embeddings.token_embedding.weight"] = embedding
    model = CLIPTextModel(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizers(folders) -> dict[str, Tokenizer]:
    return {"sd1": Tokenizer.from_folder(folders / "sd1"), "sd2": Tokenizer.from_folder(folders / "sd2")}


# The references are fp32 outputs of a 3-layer, 32-wide encoder whose activations are O(1) (LayerNorm at the end):
# each element has gone through ~ a few hundred fp32 operations (dot products of 32 and 96 terms, softmax over 77,
# two LayerNorms per layer), so two correct implementations differ by ~ 1e-5 (2^-23 * a few hundred * O(1) values).
# The weighting on top (A1111's mean ratio, compel's e + w (z - e) and its normalised lerp) adds a few operations.
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind, syntax, family, skip, prompts", [
    ("compel", "compel", "sd1", 1, "compel_prompts"),
    ("compel_skip2", "compel", "sd1", 2, "compel_prompts"),
    ("compel_sd2", "compel", "sd2", 1, "compel_prompts"),
    ("a1111", "a1111", "sd1", 1, "a1111_prompts"),
    ("a1111_sd2", "a1111", "sd2", 1, "a1111_prompts"),
    ("a1111_skip2", "a1111", "sd1", 2, "a1111_prompts"),
])
def test_contexts_match_the_references(reference, encoder_model, tokenizers, kind, syntax, family, skip, prompts):
    tensors, meta = reference
    offset = {"compel_skip2": 2, "compel_sd2": 2, "a1111_sd2": 1, "a1111_skip2": 1}.get(kind, 0)   # make_prompts.py's sub-lists
    encode = PromptEncoder(tokenizers[family], encoder_model, syntax, skip)
    cases = sorted((int(k.split("/")[1]), v) for k, v in tensors.items() if k.startswith(kind + "/"))
    assert cases
    with torch.no_grad():
        for i, expected in cases:
            got = encode(meta[prompts][offset + i])
            assert got.shape == expected.shape, (kind, i)
            if syntax == "a1111":
                got = without_mean_ratio_rounding(got, expected, f"{kind}/{i}")
            torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{kind}/{i}: {m}")


def without_mean_ratio_rounding(got: torch.Tensor, expected: torch.Tensor, case: str) -> torch.Tensor:
    """A1111's emphasis ends each 77-token chunk with z * (mean(z) / mean(z * w)): two means of thousands of O(1)
    values that nearly cancel (|mean| ~ 0.006 against mean |z| ~ 0.9 in these random encoders), so a rounding
    difference of relative size d in z becomes d * cond in that chunk's one common factor, cond = mean |z| / |mean z|
    being the sum's condition number (~150 here; another CPU's kernels showed 1e-4). So: each chunk's common factor
    must agree to TOL * (1 + 2 cond) (one cond per mean), and with it divided out every element must agree to TOL as
    for the unweighted encoders."""
    chunks = []
    for ours, theirs in zip(got.split(77, dim=1), expected.split(77, dim=1)):
        cond = (theirs.abs().mean() / theirs.mean().abs()).item()
        factor = ((ours * theirs).sum() / (theirs * theirs).sum()).item()   # least-squares common scale
        assert abs(factor - 1) <= TOL["rtol"] * (1 + 2 * cond), f"{case}: common factor {factor} (cond {cond:.0f})"
        chunks.append(ours / factor)
    return torch.cat(chunks, dim=1)


def test_a1111_long_prompt_has_two_windows(reference):
    tensors, meta = reference
    assert tensors["a1111/3"].shape == (1, 154, 32)   # the 87-token prompt of make_prompts.py


def test_plain_prompt_gives_the_same_context_in_all_syntaxes(encoder_model, tokenizers):
    """No brackets or weights, at most 75 tokens: every syntax runs the identical encoder call on identical ids, and
    A1111's rescaling by mean/mean and compel's bypass for weight 1 leave it as it is."""
    prompt = "a photograph of an astronaut riding a horse, oil painting"
    with torch.no_grad():
        plain, a1111, compel = (PromptEncoder(tokenizers["sd1"], encoder_model, s)(prompt)
                                for s in ("plain", "a1111", "compel"))
    assert torch.equal(plain, a1111) and torch.equal(plain, compel)


def test_negative_prompt_is_padded_with_the_empty_prompt(encoder_model, tokenizers):
    long_prompt = "masterpiece, best quality, " * 16 + "castle"   # 81 tokens
    with torch.no_grad():
        context = encode_prompts(tokenizers["sd1"], encoder_model, long_prompt, "", 2, "a1111")
        empty = PromptEncoder(tokenizers["sd1"], encoder_model, "a1111")("")
        prompt = PromptEncoder(tokenizers["sd1"], encoder_model, "a1111")(long_prompt)
    assert context.shape == (4, 154, 32)
    assert torch.equal(context[0], torch.cat([empty, empty], dim=1)[0]) and torch.equal(context[1], context[0])
    assert torch.equal(context[2], prompt[0]) and torch.equal(context[3], prompt[0])


def test_compel_downweight_hides_tokens_from_attention(encoder_model, tokenizers):
    """Weight ~0 (compel's floor 1e-5): the context is, but for the hidden tokens' own rows and float rounding, that
    of the prompt with the fragment masked out; weight 1 leaves the prompt alone."""
    encode = PromptEncoder(tokenizers["sd1"], encoder_model, "compel")
    with torch.no_grad():
        gone = encode("a red (ball)0 on grass")
        plain = encode("a red ball on grass")
        ids = tokenizers["sd1"](["a red ball on grass"])
        mask = torch.ones_like(ids)
        mask[0, 3] = 0                                   # "ball"
        hidden = encoder_model(ids, mask=mask)
    # lerp weights 1 and tan((1 - 1e-5) pi / 2) ~ 6.4e4: the unmasked context keeps a share of ~1.6e-5
    share = 1 / (1 + math.tan((1 - 1e-5) * math.pi / 2))
    keep = [i for i in range(77) if i != 3]
    torch.testing.assert_close(gone[0, keep], hidden[0, keep], rtol=0, atol=4 * share + 2e-5)
    assert not torch.allclose(gone, plain, atol=1e-3)


def test_bad_syntax_and_clip_skip_are_user_errors(encoder_model, tokenizers):
    with pytest.raises(UserError, match="unknown prompt syntax 'sdxl'"):
        PromptEncoder(tokenizers["sd1"], encoder_model, "sdxl")
    with pytest.raises(UserError, match="clip skip must be between 1 and 3"):
        PromptEncoder(tokenizers["sd1"], encoder_model, "a1111", clip_skip=4)


def test_clip_skip_is_the_earlier_layer_with_the_final_layer_norm(encoder_model, tokenizers):
    ids = tokenizers["sd1"](["a red cat"])
    with torch.no_grad():
        skipped = encoder_model(ids, clip_skip=2)
        t = encoder_model.text_model
        x = t.embeddings.token_embedding(ids) + t.embeddings.position_embedding.weight
        for layer in t.encoder.layers[:-1]:
            x = layer(x)
        expected = t.final_layer_norm(x)
    assert torch.equal(skipped, expected)


# --- the pipeline and the command line ----------------------------------------------------------------------------

def test_pipeline_takes_long_weighted_prompts(checkpoints):
    import sdlite
    pipe = sdlite.load(checkpoints / "sd1")
    prompt = "a (red:1.2) castle, " * 20
    settings = dict(steps=1, width=32, height=32, seed=1, scheduler="ddim")
    a1111 = pipe.txt2img(prompt, prompt_syntax="a1111", **settings)[0]
    plain = pipe.txt2img(prompt, prompt_syntax="plain", **settings)[0]
    assert a1111.size == (32, 32) and a1111.tobytes() != plain.tobytes()
    assert a1111.info["parameters"].startswith(prompt + "\n")   # written as typed


def test_show_tokens(tokenizer):
    text = describe(tokenizer, "a cat BREAK a (dog:1.2)", "a1111")
    assert text.splitlines() == ["77 tokens, 2 chunks of 75 (a1111 syntax)",
                                 "  chunk 1: 2 tokens: a cat", "  chunk 2: 2 tokens: a dog"]
    assert describe(tokenizer, "a " * 80, "plain").startswith("80 tokens, 1 chunk of 75 (plain syntax); 5 tokens")
    both = '("' + "a " * 50 + '", "' + "b " * 50 + '").and()'   # two prompts of 50 tokens, a window each
    assert describe(tokenizer, both, "compel").startswith("100 tokens, 2 chunks of 75 (compel syntax)\n")


def test_cli_warns_when_tokens_are_dropped(tmp_path, checkpoints, capsys):
    from sdlite.__main__ import main
    assert main(["txt2img", "a " * 80, "--prompt-syntax", "plain", "--model", str(checkpoints / "sd1"), "--steps",
                 "1", "--width", "32", "--height", "32", "--out", str(tmp_path / "a.png")]) == 0
    assert "warning: the prompt's last 5 tokens are past the 75 that --prompt-syntax plain keeps" in \
        capsys.readouterr().err


def test_cli_show_tokens_quiet_and_version(tmp_path, checkpoints):
    out = tmp_path / "a.png"
    result = subprocess.run([sys.executable, "-m", "sdlite", "txt2img", "a (castle:1.3), " * 30, "--model",
                             str(checkpoints / "sd1"), "--steps", "2", "--width", "32", "--height", "32",
                             "--show-tokens", "--quiet", "--clip-skip", "2", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "prompt: 90 tokens, 2 chunks of 75 (a1111 syntax)" in result.stdout   # 30 x "a", "castle", ","
    assert result.stderr == ""                              # --quiet: no progress
    assert "Clip skip: 2" in Image.open(out).text["parameters"]
    version = subprocess.run([sys.executable, "-m", "sdlite", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("sdlite 0.")


def test_sdlite_console_script_runs_the_cli():
    import configparser
    from sdlite.__main__ import main
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parent.parent / "setup.cfg")
    name, target = (part.strip() for part in setup["options.entry_points"]["console_scripts"].split("="))
    module, function = target.split(":")
    assert name == "sdlite" and getattr(__import__(module, fromlist=[function]), function) is main


def test_every_flag_has_help_and_shows_its_default():
    from sdlite.__main__ import parser
    top = parser()
    commands = next(a for a in top._actions if a.dest == "command").choices
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.dest} has no help"
            shown = formatter._get_help_string(action)
            if action.option_strings and action.default is not None and action.default is not False:  # 0 shows
                assert "default" in shown, f"{name} {action.option_strings[0]} does not show its default"


def test_progress_writes_one_line_per_update_in_a_log_and_nothing_when_quiet():
    import io
    from sdlite.progress import Progress
    log = io.StringIO()                      # not a terminal
    progress = Progress("unet", stream=log)
    progress(1, 4)
    progress(4, 4, "loss 0.1234")
    first, last = log.getvalue().splitlines()
    assert first.startswith("unet [#####               ] 1/4 steps, ")
    assert last.startswith("unet [####################] 4/4 steps, ") and last.endswith("0:00 left  loss 0.1234")
    quiet = io.StringIO()
    Progress(stream=quiet, quiet=True)(1, 4)
    assert quiet.getvalue() == ""
