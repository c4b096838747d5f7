"""Safe to embed (issue 11): no user file lost, outputs written whole, a thread-safe Pipeline, bundles that stay
inside themselves, and one line (exit 2) for every bad input, never a traceback.

Each test names the rule of README "Errors and limits" it guards. The fuzz cases are in test_fuzz.py and the
killed / full-disk runs in test_faults.py."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from illume_rt.cli import main
from illume_rt.errors import IllumeError, OutputError
from illume_rt.runtime.bundle import BundleError, load_bundle
from illume_rt.files import check_output_dir, image_target, publish_dir, save_image, scratch_dir
from illume_rt.runtime.images import smart_resize
from illume_rt.contract import LayoutError
from illume_rt.runtime.options import SamplingConfig
from illume_rt.runtime.pipeline import Pipeline
from illume_rt.runtime.prompts import understanding_ids
from illume_rt.runtime.refine import RefineConfig

from conftest import TEST_THREADS

pytestmark = pytest.mark.runtime


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line and not line.startswith("note:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header declaring width x height RGB pixels, with a tiny (truncated) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# -- 1. never destroy what is not ours ---------------------------------------------------------------------------

def test_output_dir_refuses_a_folder_that_is_not_a_bundle(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "keep.txt").write_text("keep")
    with pytest.raises(OutputError, match="not an illume-rt bundle"):
        check_output_dir(project, overwrite=True)  # no flag deletes it
    assert (project / "keep.txt").read_text() == "keep"
    monkeypatch.chdir(project)
    for target in (".", "..", str(Path.home()), "/"):
        with pytest.raises(OutputError, match="refusing"):
            check_output_dir(target, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty) == empty.resolve()
    assert check_output_dir(tmp_path / "new") == (tmp_path / "new").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_a_bundle_is_replaced_only_with_overwrite_and_never_its_source(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_dir(copy)
    assert check_output_dir(copy, overwrite=True) == copy.resolve()
    with pytest.raises(OutputError, match="source bundle"):
        check_output_dir(copy, overwrite=True, sources=(copy,))
    with pytest.raises(OutputError, match="source bundle"):
        check_output_dir(tmp_path, overwrite=True, sources=(copy,))
    # the swap: the new folder replaces the bundle, and the old one is gone only after
    work = scratch_dir(copy)
    (work / "manifest.json").write_text(json.dumps({"format": "illume-rt-bundle", "marker": 1}))
    publish_dir(work, copy, overwrite=True)
    assert json.loads((copy / "manifest.json").read_text())["marker"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no scratch left behind


@pytest.mark.export  # quantize needs the quant extra
def test_cli_export_and_quantize_keep_a_users_folder(tiny_bundle, tmp_path, monkeypatch, capsys):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "keep.txt").write_text("keep")
    monkeypatch.chdir(project)
    code, _, err = run_cli(capsys, "export", "--preset", "tiny", "-o", ".")
    assert_one_line_error(code, err, "refusing")
    code, _, err = run_cli(capsys, "export", "--preset", "tiny", "-o", ".", "--overwrite")
    assert_one_line_error(code, err, "refusing")
    sub = project / "sub"
    sub.mkdir()
    (sub / "notes.md").write_text("mine")
    code, _, err = run_cli(capsys, "export", "--preset", "tiny", "-o", "sub", "--overwrite")
    assert_one_line_error(code, err, "not an illume-rt bundle")
    pytest.importorskip("modelopt.onnx.quantization", reason="quantize needs the quant extra")
    code, _, err = run_cli(capsys, "quantize", tiny_bundle, "--precision", "int8", "--target", "ort-cpu", "-o", ".")
    assert_one_line_error(code, err, "refusing")
    code, _, err = run_cli(capsys, "quantize", tiny_bundle, "--precision", "int8", "--target", "ort-cpu",
                           "-o", tiny_bundle, "--overwrite")
    assert_one_line_error(code, err, "source bundle")
    assert sorted(p.name for p in project.rglob("*")) == ["keep.txt", "notes.md", "sub"]
    load_bundle(tiny_bundle)  # untouched


def test_stale_scratch_of_a_dead_writer_is_cleaned(tmp_path):
    out = tmp_path / "bundle"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".bundle.tmp-{int(dead.stdout)}-abc123"
    stale.mkdir()
    (stale / "llm.onnx").write_bytes(b"partial")
    live = tmp_path / f".bundle.tmp-{os.getppid()}-xyz789"  # a live process's (our parent's): kept
    live.mkdir()
    other = tmp_path / ".unrelated.tmp-1-abc"
    other.mkdir()
    work = scratch_dir(out)
    assert not stale.exists() and live.exists() and other.exists() and work.is_dir()


# -- 2. outputs written safely -----------------------------------------------------------------------------------

def test_image_targets_that_are_not_regular_files_are_refused(tmp_path):
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(OutputError, match="a folder"):
        image_target(folder)
    with pytest.raises(OutputError, match="a device"):
        image_target("/dev/null")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="a FIFO"):
        image_target(fifo)
    with pytest.raises(OutputError, match=r"\.png, \.jpg or \.webp"):
        image_target(tmp_path / "out.gif")
    with pytest.raises(OutputError, match=r"\.png, \.jpg or \.webp"):
        image_target(tmp_path / "out")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        image_target(tmp_path / "afile" / "x.png")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # untouched


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".JPG", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_save_image_follows_the_extension(tmp_path, suffix, fmt):
    pixels = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    out = save_image(pixels, tmp_path / "sub" / f"image{suffix}")
    with Image.open(out) as img:
        assert img.format == fmt and img.size == (48, 32)
        if fmt in ("PNG",):
            assert np.array_equal(np.asarray(img), pixels)
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)  # the mode a new file gets, not mkstemp's
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_symlinked_target_writes_its_file(tmp_path):
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    save_image(np.zeros((8, 8, 3), np.uint8), link)
    assert link.is_symlink() and Image.open(real).size == (8, 8)


WRITER = """
import sys
import numpy as np
from illume_rt.files import save_image
value, path = int(sys.argv[1]), sys.argv[2]
pixels = np.full((256, 256, 3), value, np.uint8)
pixels[::7] = 255 - value  # something for zlib to work on
for _ in range(25):
    save_image(pixels, path)
"""


def test_two_processes_writing_one_path_each_leave_a_whole_file(tmp_path):
    out = tmp_path / "shared.png"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(v), str(out)]) for v in (40, 200)]
    seen = set()
    while any(p.poll() is None for p in procs):
        if out.exists():  # a reader at any moment sees one whole image
            with Image.open(out) as img:
                seen.add(int(np.asarray(img)[1, 0, 0]))
    assert [p.returncode for p in procs] == [0, 0]
    with Image.open(out) as img:
        seen.add(int(np.asarray(img)[1, 0, 0]))
    assert seen <= {40, 200} and seen
    assert [p.name for p in tmp_path.iterdir()] == ["shared.png"]  # no temporary file left


# -- 3. a thread-safe Pipeline -----------------------------------------------------------------------------------

def _calls(image: Image.Image):
    sampled = SamplingConfig(top_k=40, top_p=0.9)
    return [
        ("generate", lambda p: p.generate("a cat with a hat", seed=1, sampling=sampled)),
        ("generate", lambda p: p.generate("two green squares", seed=2, sampling=sampled)),
        ("understand", lambda p: p.understand(image, "What is in the image?", max_new_tokens=12)),
        ("edit", lambda p: p.edit(image, "make it red", seed=3)),
        ("generate", lambda p: p.generate("a dog", (512, 512), seed=4, sampling=SamplingConfig(greedy=True))),
        ("understand", lambda p: p.understand(image.rotate(90, expand=True), "Which shape?", max_new_tokens=8)),
    ]


def _outcome(kind, result):
    if kind == "understand":
        return tuple(result.token_ids)
    return result.tokens.semantic.tobytes() + result.tokens.pixel.tobytes() + result.image.tobytes()


def test_one_pipeline_shared_by_threads_gives_each_call_what_it_gives_alone(tiny_bundle):
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    calls = _calls(image)
    alone = [_outcome(kind, fn(Pipeline.from_bundle(tiny_bundle, threads=TEST_THREADS))) for kind, fn in calls]
    assert len(set(alone[:2])) == 2  # the seeds and prompts differ, so a mixed-up result would show
    shared = Pipeline.from_bundle(tiny_bundle, threads=TEST_THREADS)
    jobs = [calls[(i * 3 + j) % len(calls)] for i in range(4) for j in range(3)]  # 4 threads x 3 mixed calls
    start = threading.Barrier(4)

    def worker(i):
        start.wait()
        return [(calls.index(jobs[i * 3 + j]), _outcome(jobs[i * 3 + j][0], jobs[i * 3 + j][1](shared)))
                for j in range(3)]

    with ThreadPoolExecutor(4) as pool:
        results = [r for chunk in pool.map(worker, range(4)) for r in chunk]
    assert len(results) == 12
    for index, outcome in results:
        assert outcome == alone[index], f"call {index} ({calls[index][0]}) differs when threads share the pipeline"


# -- 4. bundles stay inside themselves ---------------------------------------------------------------------------

@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    """A copy of the tiny bundle made of hard links (cheap; the manifest is a real copy, to be mutated)."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy, copy_function=os.link)
    (copy / "manifest.json").unlink()
    shutil.copyfile(Path(tiny_bundle) / "manifest.json", copy / "manifest.json")
    return copy


def _mutate(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest = change(manifest) or manifest
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _set(path: list, value):
    def change(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return change


MUTATIONS = {
    "absolute path": (_set(["components", "llm", "file"], "/etc/passwd"), "components.llm.file"),
    "parent path": (_set(["tables", "embed_tokens", "file"], "../other/embed_tokens.npy"), "tables.embed_tokens.file"),
    "windows path": (_set(["files", "x"], {"file": "..\\x", "bytes": 1, "sha256": "0" * 64}), "files.x.file"),
    "manifest is a list": (lambda m: [m], "JSON object"),
    "missing key": (_set(["llm"], KeyError), "llm"),
    "wrong type": (_set(["llm", "num_hidden_layers"], "4"), "llm.num_hidden_layers"),
    "boolean for a number": (_set(["llm", "head_dim"], True), "llm.head_dim"),
    "negative dim": (_set(["llm", "max_context"], -1), "llm.max_context"),
    "table larger than its file": (_set(["tables", "pixel_codebook", "shape"], [1 << 20, 64]),
                                   "tables.pixel_codebook.shape"),
    "bad hash": (_set(["components", "llm", "sha256"], "xyz"), "components.llm.sha256"),
    "bad vocab": (_set(["vocab", "vocab_rows"], 3), "vocab"),
    "entry not an object": (_set(["components", "llm"], "llm.onnx"), "components.llm"),
    "unknown tokenizer": (_set(["tokenizer", "kind"], "sentencepiece"), "tokenizer.kind"),
    "bad dtype": (_set(["tables", "embed_tokens", "dtype"], "object"), "tables.embed_tokens.dtype"),
    "old format": (_set(["format_version"], 1), "re-export"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_malformed_manifests_get_one_line_naming_the_field(bundle_copy, mutation, monkeypatch):
    change, field = MUTATIONS[mutation]
    _mutate(bundle_copy, change)
    opened = []
    monkeypatch.setattr("illume_rt.runtime.bundle.sha256_file", lambda path: opened.append(path))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    assert field in str(info.value) and "\n" not in str(info.value)
    assert not opened  # refused before any file the manifest names was read


def test_a_symlink_leaving_the_bundle_is_refused(bundle_copy, tiny_bundle):
    head = bundle_copy / "lm_head_text.onnx"
    head.unlink()
    head.symlink_to(Path(tiny_bundle) / "lm_head_text.onnx")  # same size and hash: only the path gives it away
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(bundle_copy)
    head.unlink()
    os.link(Path(tiny_bundle) / "lm_head_text.onnx", head)
    inner = bundle_copy / "alias.onnx"
    inner.symlink_to("lm_head_text.onnx")  # a link that stays inside is fine
    _mutate(bundle_copy, _set(["components", "lm_head_text", "file"], "alias.onnx"))
    assert load_bundle(bundle_copy).component_path("lm_head_text") == inner


def test_cli_reports_a_malformed_bundle_on_one_line(bundle_copy, tmp_path, capsys):
    _mutate(bundle_copy, lambda m: [m])
    code, _, err = run_cli(capsys, "generate", "x", "--bundle", bundle_copy, "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, "JSON object")
    (bundle_copy / "manifest.json").write_text("{")
    code, _, err = run_cli(capsys, "generate", "x", "--bundle", bundle_copy, "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, "not valid JSON")
    assert not (tmp_path / "x.png").exists()


# -- 5. every bad input: one line, before any work -----------------------------------------------------------------

BAD_ARGUMENTS = {
    "negative seed": (["--seed", "-1"], "--seed"),
    "nan guidance": (["--guidance", "nan"], "finite"),
    "inf temperature": (["--temperature", "inf"], "finite"),
    "zero temperature": (["--temperature", "0"], "above 0"),
    "top-p over 1": (["--top-p", "1.5"], "at most 1"),
    "negative threads": (["--threads", "-3"], "--threads"),
    "too many threads": (["--threads", "100000"], "cores"),
    "refine steps": (["--refine", "--steps", "99999999"], "--steps"),
    "refine guidance nan": (["--refine", "--refine-guidance", "nan"], "finite"),
    "resolution": (["--resolution", "300x300"], "unsupported resolution"),
    "non-UTF-8 prompt": (["--", "caf\udce9"], "UTF-8"),
    "unsupported extension": (["-o", "OUT/x.gif"], ".gif"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_generate_arguments_get_one_line_before_any_work(tiny_bundle, tmp_path, capsys, case, monkeypatch):
    extra, needle = BAD_ARGUMENTS[case]
    opened = []
    monkeypatch.setattr(Pipeline, "__init__", lambda *a, **k: opened.append(a))
    extra = [str(tmp_path / "x.gif") if a == "OUT/x.gif" else a for a in extra]
    prompt = [] if "--" in extra else ["a cat"]
    code, _, err = run_cli(capsys, "generate", *prompt, "--bundle", tiny_bundle, "-o", tmp_path / "x.png", *extra)
    assert_one_line_error(code, err, needle)
    assert not opened and list(tmp_path.iterdir()) == []


def test_bad_images_get_one_line(tiny_bundle, tmp_path, capsys, monkeypatch):
    bomb = huge_png(tmp_path / "bomb.png", 20000, 20000)
    code, _, err = run_cli(capsys, "understand", bomb, "What is it?", "--bundle", tiny_bundle)
    assert_one_line_error(code, err, "400 megapixels", "ILLUME_RT_MAX_IMAGE_PIXELS")
    bomb = huge_png(tmp_path / "big.png", 9000, 9000)  # under Pillow's limit, over ours: refused from the header
    code, _, err = run_cli(capsys, "understand", bomb, "What is it?", "--bundle", tiny_bundle)
    assert_one_line_error(code, err, "9000x9000 (81 megapixels)", "ILLUME_RT_MAX_IMAGE_PIXELS")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, _, err = run_cli(capsys, "edit", tmp_path / "junk.png", "make it red", "--bundle", tiny_bundle,
                           "-o", tmp_path / "e.png")
    assert_one_line_error(code, err, "cannot read")
    Image.new("RGB", (1, 500)).save(tmp_path / "sliver.png")
    code, _, err = run_cli(capsys, "understand", tmp_path / "sliver.png", "What?", "--bundle", tiny_bundle)
    assert_one_line_error(code, err, "aspect ratio")
    code, _, err = run_cli(capsys, "understand", tmp_path / "none.png", "What?", "--bundle", tiny_bundle)
    assert_one_line_error(code, err, "does not exist")
    monkeypatch.setenv("ILLUME_RT_MAX_IMAGE_PIXELS", "lots")
    code, _, err = run_cli(capsys, "understand", tmp_path / "sliver.png", "What?", "--bundle", tiny_bundle)
    assert_one_line_error(code, err, "ILLUME_RT_MAX_IMAGE_PIXELS")
    assert not (tmp_path / "e.png").exists()


def test_thin_images_are_edited_at_their_size(tiny_pipe):
    thin = Image.fromarray(np.full((1, 150, 3), 90, np.uint8))  # 1x150: the padded anchor keeps one row
    result = tiny_pipe.edit(thin, "make it red", seed=0, sampling=SamplingConfig(greedy=True))
    assert result.image.shape == (1, 150, 3)


def test_refine_without_a_decoder_is_refused_before_decoding(bundle_copy, tmp_path, capsys, monkeypatch):
    _mutate(bundle_copy, _set(["diffusion"], None))
    decoded = []
    monkeypatch.setattr("illume_rt.runtime.pipeline.generate_image_tokens", lambda *a, **k: decoded.append(1))
    code, _, err = run_cli(capsys, "generate", "a cat", "--bundle", bundle_copy, "--refine", "-o",
                           tmp_path / "x.png", "--threads", "1")
    assert_one_line_error(code, err, "no diffusion decoder")
    pipe = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    with pytest.raises(BundleError, match="no diffusion decoder"):
        pipe.generate("a cat", refine=RefineConfig())
    assert not decoded


def test_api_values_are_validated(tiny_pipe):
    for sampling in (SamplingConfig(guidance_scale=float("nan")), SamplingConfig(temperature=float("inf")),
                     SamplingConfig(top_p=float("nan")), SamplingConfig(top_k=2.5)):
        with pytest.raises(LayoutError):
            tiny_pipe.generate("a cat", sampling=sampling)
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(LayoutError, match="seed"):
            tiny_pipe.generate("a cat", seed=seed)
    with pytest.raises(LayoutError, match="UTF-8"):
        tiny_pipe.generate("caf\udce9")
    with pytest.raises(LayoutError, match="threads"):
        Pipeline(tiny_pipe.bundle, threads=0)
    with pytest.raises(IllumeError, match="backend"):
        Pipeline(tiny_pipe.bundle, backend="cuda")
    with pytest.raises(LayoutError, match="steps"):
        tiny_pipe.generate("a cat", refine=RefineConfig(steps=0))


def test_understand_fits_any_photo_to_the_context(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle, threads=TEST_THREADS)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (3000, 4000, 3), dtype=np.uint8))
    size, answer, notices = pipe.fit_understanding(photo, 20, 1024)
    assert size == smart_resize(3000, 4000) == (656, 880)  # the full budget fits tiny's 4096 positions
    assert answer == 1024 and not notices
    pipe.lm.max_context = 1200  # a smaller context: the image shrinks and the answer is capped
    question = "What is in the image?"
    prompt = len(understanding_ids(pipe.tokenizer, pipe.vocab, question)) - 1  # the image replaces one id
    size, answer, notices = pipe.fit_understanding(photo, prompt, 1024)
    from illume_rt.runtime.multimodal import image_block_length

    assert size[0] * size[1] < 656 * 880 and size[1] > size[0]  # scaled down, aspect kept
    assert 32 <= answer < 1024 and prompt + image_block_length(*size) + answer == 1200
    assert [n for n in notices if "scaled" in n] == notices and notices
    result = pipe.understand(photo, question, max_new_tokens=1024)
    assert result.notices[0] == notices[0] and len(result.token_ids) <= answer
    ran_into_the_cap = len(result.token_ids) == answer and result.token_ids[-1] != pipe.vocab.im_end_id
    assert any("cut at" in n for n in result.notices) == ran_into_the_cap
    pipe.lm.max_context = 40
    with pytest.raises(LayoutError, match="shorter question"):
        pipe.understand(photo, "What is in the image?")


def test_untrained_resolution_gets_a_notice(bundle_copy, tmp_path, capsys):
    _mutate(bundle_copy, _set(["model", "trained_resolutions"], [[256, 256]]))
    pipe = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    assert pipe.resolution_notice((256, 256)) is None
    assert "256x256" in pipe.resolution_notice((512, 512))
    code, _, err = run_cli(capsys, "generate", "a cat", "--bundle", bundle_copy, "--resolution", "512x512",
                           "-o", tmp_path / "x.png", "-q", "--threads", "1")
    assert code == 0 and "note: this model was trained at 256x256 only" in err


def test_a_bundle_that_missed_its_quantization_gates_says_so_in_every_result(bundle_copy, tmp_path, capsys):
    pipe = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    assert pipe.bundle_notices == []  # an FP32 bundle (no quantization entry) carries none
    _mutate(bundle_copy, _set(["quantization"], {"precision": "int8", "status": "failed", "failures": ["llm"]}))
    pipe = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    tiny_image = Image.new("RGB", (32, 32), (200, 30, 30))
    results = [pipe.generate("a cat", sampling=SamplingConfig(greedy=True)),
               pipe.edit(tiny_image, "make it blue", sampling=SamplingConfig(greedy=True)),
               pipe.understand(tiny_image, "What colour is it?", max_new_tokens=2)]
    for result in results:
        assert any("missed its int8 accuracy gates" in line for line in result.notices), result.notices
    code, _, err = run_cli(capsys, "generate", "a cat", "--bundle", bundle_copy, "-o", tmp_path / "x.png", "-q",
                           "--threads", "1")
    assert code == 0 and "note: this bundle missed its int8 accuracy gates" in err


def test_cli_refuses_writing_an_image_over_a_folder_or_device(tiny_bundle, tmp_path, capsys):
    for target, needle in ((tmp_path, "a folder"), ("/dev/null", "a device")):
        code, _, err = run_cli(capsys, "generate", "a cat", "--bundle", tiny_bundle, "-o", target)
        assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_every_user_error_derives_from_the_one_base():
    from illume_rt.engines.base import BackendError
    from illume_rt.engines.engine_cache import EngineCacheError
    from illume_rt.engines.profiles import ProfileError
    from illume_rt.runtime.scheduler import SchedulerError

    errors = [BackendError, BundleError, LayoutError, OutputError, SchedulerError, ProfileError, EngineCacheError]
    try:
        from illume_rt.calibration.quantize import QuantizationError
        from illume_rt.export.components import ExportError

        errors += [ExportError, QuantizationError]
    except ImportError:  # runtime-only install
        pass
    assert all(issubclass(e, IllumeError) for e in errors)


def test_an_unexpected_exception_is_one_line_and_exit_70(monkeypatch, capsys, tmp_path):
    import illume_rt.cli as cli

    def boom(args):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(cli, "cmd_generate", boom)
    code, _, err = run_cli(capsys, "generate", "x", "-o", tmp_path / "x.png")
    assert code == 70 and "internal error: ZeroDivisionError: planted" in err and "Traceback" not in err
    monkeypatch.setenv("ILLUME_RT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["generate", "x", "-o", str(tmp_path / "x.png")])


# -- 6. safe loading ---------------------------------------------------------------------------------------------

def test_no_torch_load_without_weights_only():
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        if any(part in (".venv", "build", ".git") for part in path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func, "value", None) is not None and getattr(node.func.value, "id", "") == "torch":
                flags = {k.arg: k.value for k in node.keywords}
                if not (isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_without_a_bundle_a_runtime_only_install_names_the_export_extra(tmp_path):
    """Issue 15, item 8: with no --bundle and nothing cached, an install without the export extra cannot export the
    built-in model: one line naming the extra, exit 2, nothing written. In .ci/run's runtime-only environment this is
    the real install; where torch and onnx are installed, the process is made not to find them."""
    import importlib.util

    installed = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is not None]
    hide = "".join(f"sys.modules[{m!r}] = None; " for m in installed)  # find_spec then answers None, as uninstalled
    # and as a wheel built without `illume-rt package-builtin` (.ci/run packages the built-in model for its
    # runtime-only install, where the main job then runs without torch)
    script = (f"import sys, pathlib; {hide}from illume_rt import cli; "
              f"cli.packaged_bundle_path = lambda preset: pathlib.Path({str(tmp_path / 'no-package')!r}); "
              "sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ILLUME_RT_CACHE": str(tmp_path / "cache")}
    image = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    for argv in (["generate", "a cat", "-o", str(tmp_path / "out.png")], ["understand", str(image), "What?"],
                 ["edit", str(image), "make it blue", "-o", str(tmp_path / "edited.png")]):
        run = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                             timeout=120)
        assert_one_line_error(run.returncode, run.stderr, "pip install 'illume-rt[export]'", "--bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # no image, no cache, no half-exported bundle


def test_a_model_declared_sampling_default_is_what_a_call_without_sampling_gets(bundle_copy, tmp_path, capsys):
    """A bundle may declare its model's sampling defaults (manifest model.sampling_defaults, as illume-nano's);
    the API and the CLI use them when the caller gives none, and a CLI option replaces only its own field."""
    from dataclasses import replace

    from illume_rt.runtime.options import OFFICIAL_SAMPLING

    declared = {"text_to_image": {"temperature": 0.4, "top_p": 0.5}, "editing": {"guidance_scale": 1.2}}
    _mutate(bundle_copy, _set(["model", "sampling_defaults"], declared))
    pipe = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    want = replace(OFFICIAL_SAMPLING["text_to_image"], temperature=0.4, top_p=0.5)
    assert pipe.default_sampling("text_to_image") == want
    assert pipe.default_sampling("editing") == replace(OFFICIAL_SAMPLING["editing"], guidance_scale=1.2)

    def codes(result):
        return np.concatenate([result.tokens.semantic.ravel(), result.tokens.pixel.ravel()])

    plain = codes(pipe.generate("a cat", seed=3))
    assert np.array_equal(plain, codes(pipe.generate("a cat", seed=3, sampling=want)))
    assert not np.array_equal(plain, codes(pipe.generate("a cat", seed=3, sampling=OFFICIAL_SAMPLING["text_to_image"])))
    code, _, err = run_cli(capsys, "generate", "a cat", "--bundle", bundle_copy, "--seed", "3", "--top-p", "1.0",
                           "-o", tmp_path / "x.png", "-q", "--threads", "1")
    assert code == 0, err
    cli_image = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))
    assert np.array_equal(cli_image, pipe.generate("a cat", seed=3, sampling=replace(want, top_p=1.0)).image)


def test_a_model_declared_refine_default_is_what_refine_without_options_gets(bundle_copy, tmp_path, capsys):
    """A bundle may declare its diffusion decoder's refinement defaults (manifest model.refine_defaults, as
    illume-nano's guidance): ``default_refine`` and ``--refine`` use them, and an option replaces only its field."""
    _mutate(bundle_copy, _set(["model", "refine_defaults"], {"guidance_scale": 1.0}))
    pipe = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    assert pipe.default_refine() == RefineConfig(steps=20, guidance_scale=1.0)
    greedy = SamplingConfig(greedy=True)
    declared = pipe.generate("a cat", seed=3, sampling=greedy, refine=RefineConfig(steps=2, guidance_scale=1.0)).image
    official = pipe.generate("a cat", seed=3, sampling=greedy, refine=RefineConfig(steps=2)).image
    assert not np.array_equal(declared, official)  # the guidance matters, so the check below can fail
    code, _, err = run_cli(capsys, "generate", "a cat", "--bundle", bundle_copy, "--seed", "3", "--greedy",
                           "--refine", "--steps", "2", "-o", tmp_path / "x.png", "-q", "--threads", "1")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")), declared)


def test_a_model_trained_at_no_official_anchor_edits_at_its_own_size(bundle_copy):
    _mutate(bundle_copy, _set(["model", "trained_resolutions"], [[256, 256]]))
    pipe = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    assert pipe.edit_anchors == ((256, 256),)
    result = pipe.edit(Image.new("RGB", (40, 30), (200, 30, 30)), "make it blue", sampling=SamplingConfig(greedy=True))
    assert result.tokens.semantic.shape == (9, 9) and result.image.shape == (30, 40, 3)
    assert not any("trained at" in line for line in result.notices)


class _ShapeRecorder:
    """An Engine wrapper that records the shapes of each call's inputs."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.calls = []

    def run(self, feeds, out=None):
        self.calls.append({k: tuple(np.shape(v)) for k, v in feeds.items()})
        return self.inner.run(feeds)


def test_warm_up_runs_the_decoders_once_at_each_resolution_and_refuses_first(bundle_copy):
    """Pipeline.warm_up: the pixel decoder once per resolution at that grid's shapes, the refinement graphs once
    (one UNet step, both guidance rows) when asked; a bad size, or refinement without a decoder, refused before
    any graph runs."""
    pipe = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    sizes = [(256, 256), (512, 512)]
    with pipe.wrapped_engine("pixel_decoder", _ShapeRecorder) as decoder, \
            pipe.wrapped_engine("diffusion_unet", _ShapeRecorder) as unet:
        seconds = pipe.warm_up(sizes, refine=True)
    assert set(seconds) == {f"{h}x{w} {stage}" for h, w in sizes for stage in ("pixel_decoder", "refinement")}
    from illume_rt.contract import GRAPH_IO, image_grid

    grids = [image_grid(*s) for s in sizes]
    assert [c[GRAPH_IO["pixel_decoder"][0][1]][-2:] for c in decoder.calls] == [
        (g.pixel_rows, g.pixel_cols) for g in grids]
    guided = pipe.default_refine().guidance_scale > 1.0
    assert len(unet.calls) == len(sizes) and all(c[next(iter(c))][0] == (2 if guided else 1) for c in unet.calls)
    with pipe.wrapped_engine("pixel_decoder", _ShapeRecorder) as decoder:
        with pytest.raises(LayoutError, match="unsupported resolution 100x100"):
            pipe.warm_up([(256, 256), (100, 100)])
        assert decoder.calls == []
    _mutate(bundle_copy, _set(["diffusion"], None))
    bare = Pipeline.from_bundle(bundle_copy, threads=TEST_THREADS)
    with bare.wrapped_engine("pixel_decoder", _ShapeRecorder) as decoder:
        with pytest.raises(BundleError, match="no diffusion decoder"):
            bare.warm_up(refine=True)
        assert decoder.calls == []
