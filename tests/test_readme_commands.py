"""Every fenced command in README.md runs here, as written (issue 24, item 2).

Which blocks are commands: every fenced block (``` or ~~~, indented ones included) whose info
string is `bash`, `sh`, `shell`, `zsh` or `console` holds shell commands. Every other fenced block
(a diagram, the output layout, Python, SQL) must be listed in OTHER_BLOCKS by its language and
first line, with what covers it; so a command put into a plain ``` block fails the test too.

How a block splits into commands: lines ending in `\\` continue on the next; whole-line comments
and `# ...` comments (a `#` outside quotes, at the start of a word) are dropped; in a `console`
block only the lines after a `$ ` prompt are commands. A command's key is its text with runs of
whitespace collapsed to one space: change a README command and its key changes, so the test then
fails naming the new command (no entry) and the old entry (stale) until the table follows.

What COMMANDS says for each key, one of:
  Run   the command runs with bash from a copy of this repository (its tracked files, `.venv`
        linked to the interpreter running the tests), in a fresh HOME, the venv not on PATH: a
        user's shell in a fresh clone. Only PLACEHOLDERS are substituted (the README's /models,
        /saes and /data roots -> a folder of tiny random-weight checkpoints, dictionaries and
        corpora at the same relative paths); an entry may add `subs` (text -> text, e.g. the
        dashboard port) and `append` arguments, each with its reason (sizes: the default
        135M-parameter model -> a tiny Llama, the demo SAE's fit and the default corpus -> a few
        thousand tokens; a private Ray head's ports). An appended Hydra key may not be one the
        command sets. Then: exit status 0, every output path the README names for it exists, and
        the output says what it should. `after` lists the commands a user runs before it (the
        README's order); they run first, once per module.
  Skip  the command needs what this machine lacks, or is covered elsewhere: its reason, and the
        tests that validate what it uses (each must exist); files it names must exist; a `make`
        target is checked with `make -n`.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TEXTS, build_tiny_llama, build_tokenizer
from sae_files import write_openai_sae, write_own_sae
from test_ray_job import free_ports, stop_ray_session, user_env, wait_for_dashboard

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "zsh", "console"}

# The README's placeholder roots -> the same relative paths under the test's fake filesystem root
# (see `fake_fs` for what lies there). Nothing else in a command is replaced, except per-entry `subs`.
PLACEHOLDERS = {
    "/models": "tiny random-weight Hugging Face checkpoints: models/llama (16-block Llama), models/gpt2 "
               "(9-block GPT-2), models/pythia-160m/step1000 and step143000 (8-block GPT-NeoX, two seeds)",
    "/saes": "tiny dictionaries: saes/llama/layers.12 (own format), saes/pythia-xc-l6 (a crosscoder over "
             "step1k/layers.6 + step143k/layers.6), saes/openai/gpt2-small/resid_post_mlp_v5_32k/autoencoders/8.pt "
             "(OpenAI format, 256 latents)",
    "/data": "data/web/a.jsonl, b.jsonl: a few dozen documents",
}

# Sizes, appended where a command runs the default model (SmolLM2-135M, 30 blocks, as a GGUF; its
# own runs: tests/test_newcomer_output.py, `make demo` in small) and so fits the demo SAE on it first.
TINY_DEFAULT_MODEL = ("model.path={fs}/models/llama",)
DEMO_SAE_SIZE = ("sae.train.n_latents=128", "sae.train.k=8", "sae.train.tokens=1024", "sae.train.epochs=1",
                 "sae.train.batch_size=256")
# The default corpus (pkg:pydoc) holds ~1M tokens: a command that sets no budget gets one.
PYDOC_SIZE = ("corpus.max_tokens=2048",)
DEMO_SAE_LATENTS = 128  # sae.train.n_latents above: results/mine's explanations cover them all


@dataclass(frozen=True)
class Run:
    id: str
    outputs: tuple[str, ...] = ()  # globs under the working folder, each must match
    expect: tuple[str, ...] = ()  # regexes its output must contain
    append: tuple[str, ...] = ()  # arguments added at the end ({fs}, {ws}, {ray_*} filled in)
    subs: tuple[tuple[str, str], ...] = ()  # (text in the README command, what it becomes)
    why: str = ""  # why `append` / `subs` are there
    after: tuple[str, ...] = ()  # ids of the commands a user runs before this one
    python: bool = False  # a ```python block: run with the venv's interpreter
    unset: tuple[str, ...] = ()  # variables of the session's environment it runs without (see `session`)


@dataclass(frozen=True)
class Skip:
    id: str
    reason: str
    covered_by: tuple[str, ...] = ()  # "tests/test_x.py::test_name", each must exist
    make_target: str | None = None  # checked with `make -n TARGET`


COMMANDS: dict[str, Run | Skip] = {
    "make demo": Skip(
        "make-demo", "runs the default 135M model over 204,800 tokens (9 min on this machine); its command "
        "`python -m pipeline experiment=demo` on the default model and the demo SAE's fit, in small and from a "
        "clean HOME, is tests/test_newcomer_output.py",
        covered_by=("tests/test_newcomer_output.py::test_default_model_run_prints_our_lines_only",),
        make_target="demo"),
    "make test": Skip("make-test", "it is this suite", make_target="test"),
    ".venv/bin/python -m pipeline experiment=none run_id=web-l12 corpus=files 'corpus.paths=[/data/web/*.jsonl]' "
    "model=hf model.path=/models/llama \"sae.path='/saes/llama/{hookpoint}'\" 'sae.hookpoints=[layers.12]'": Run(
        "web-l12",
        outputs=("out/web-l12/manifest.json", "out/web-l12/summary.json", "out/web-l12/_commits/shard=000000.json",
                 "out/web-l12/contexts/shard=000000/part-0.parquet",
                 "out/web-l12/latents/hookpoint=layers.12/shard=000000/part-0.parquet"),
        expect=(r"run web-l12: \d+ shards written",)),
    "GPT2_PATH=/models/gpt2 SAE_ROOT=/saes .venv/bin/python -m pipeline experiment=gpt2_openai_v5_32k "
    "'corpus.paths=[/data/web/*.jsonl]'": Run(
        "gpt2-preset",
        outputs=("out/gpt2-openai-v5-32k/manifest.json",
                 "out/gpt2-openai-v5-32k/latents/hookpoint=layers.8/shard=000000/part-0.parquet"),
        expect=(r"run gpt2-openai-v5-32k: \d+ shards written",)),
    ".venv/bin/python -m pipeline -m experiment=none run_id=sweep 'sae.hookpoints=[layers.4],[layers.8]' "
    "sae.k=32,64": Run(
        "sweep",
        outputs=tuple(f"out/sweep--sae.hookpoints=layers.{h},sae.k={k}/latents/hookpoint=layers.{h}/shard=000000/part-0.parquet"
                      for h in (4, 8) for k in (32, 64)),
        expect=(r"\[sweep\] member sweep--sae.hookpoints=layers.8,sae.k=64",),
        append=TINY_DEFAULT_MODEL + DEMO_SAE_SIZE + PYDOC_SIZE,
        why="the default model, the demo SAE's fit and the default corpus in small"),
    ".venv/bin/python -m pipeline experiment=none run_id=check sae.fvu_sample=256 'corpus.max_tokens=20000'": Run(
        "check",
        outputs=("out/check/manifest.json", "out/check/latents/hookpoint=layers.12/shard=000000/part-0.parquet"),
        expect=(r"FVU check layers\.12: FVU \d",),
        append=TINY_DEFAULT_MODEL + DEMO_SAE_SIZE,
        why="the default model and the demo SAE's fit in small"),
    ".venv/bin/python -m pipeline experiment=none run_id=pythia-xc model.path=/models/pythia-160m/step143000 "
    "+model.checkpoints.step1k=/models/pythia-160m/step1000 +model.checkpoints.step143k=/models/pythia-160m/step143000 "
    "'sae.hookpoints=[]' +sae.crosscoders.births=/saes/pythia-xc-l6 sae.fvu_sample=256": Run(
        "pythia-xc",
        outputs=("out/pythia-xc/manifest.json", "out/pythia-xc/latents/crosscoder=births/shard=*/part-0.parquet"),
        expect=(r"run pythia-xc: \d+ shards written", r"FVU check crosscoder=births: FVU \d"),
        append=PYDOC_SIZE, why="the default corpus in small"),
    ".venv/bin/python -m pipeline experiment=none run_id=mine corpus=files 'corpus.paths=[data/*.jsonl]'": Run(
        "mine",
        outputs=("out/mine/manifest.json", "out/mine/_commits/shard=000000.json",
                 "out/mine/latents/hookpoint=layers.12/shard=000000/part-0.parquet"),
        expect=(r"run mine: \d+ shards written",),
        append=TINY_DEFAULT_MODEL + DEMO_SAE_SIZE,
        why="the default model and the demo SAE's fit in small; data/*.jsonl is the user's corpus (written there)"),
    ".venv/bin/ray start --head --dashboard-host=127.0.0.1 --num-cpus=2": Run(
        "ray-start",
        expect=(r"Ray runtime started",),
        append=("--port={ray_gcs}", "--dashboard-port={ray_dashboard}", "--ray-client-server-port={ray_client}",
                "--dashboard-agent-listen-port={ray_agent_http}", "--dashboard-agent-grpc-port={ray_agent_grpc}",
                "--metrics-export-port={ray_metrics}", "--runtime-env-agent-port={ray_runtime_env}",
                "--temp-dir={ray_temp}", "--disable-usage-stats"),
        unset=("RAY_ADDRESS",),  # the head's processes, and so the job's driver, get Ray's own RAY_ADDRESS
        why="a private head (free ports, its own temp dir) that neither collides with the machine's other Ray "
            "instances nor is found by their ray.init(); stopped by its temp dir at the end (tests/test_ray_job.py)",
        after=("mine",)),  # after a local run, as in the README: ~/.ray/auth_token exists, the head turns auth on
    "infra/submit.sh http://127.0.0.1:8265 experiment=none cluster=cpu_cluster run_id=job-demo "
    "'corpus.max_tokens=20000' sink.root=$PWD/out": Run(
        "submit",
        outputs=("out/job-demo/manifest.json", "out/job-demo/_commits/shard=000000.json",
                 "out/job-demo/latents/hookpoint=layers.12/shard=000000/part-0.parquet"),
        expect=(r"succeeded", r"run job-demo: \d+ shards written", r"\[submit\] job python: .*/\.venv/bin/python"),
        subs=(("http://127.0.0.1:8265", "http://127.0.0.1:{ray_dashboard}"),),
        append=TINY_DEFAULT_MODEL + DEMO_SAE_SIZE,
        unset=("RAY_ADDRESS",),  # `ray job submit` prefers RAY_ADDRESS to its --address
        why="the private head's dashboard port; the default model and the demo SAE's fit in small",
        after=("ray-start",)),
    "kubectl apply -f infra/k8s/raycluster.yaml -f infra/k8s/cronjob-nightly.yaml": Skip(
        "kubectl", "needs kubectl and a Kubernetes cluster with the KubeRay operator; the manifests are validated "
        "offline against the Kubernetes and KubeRay CRD schemas, and their overrides composed",
        covered_by=("tests/test_infra.py::test_kuberay_manifests_match_crd_schema_and_pod_schema",
                    "tests/test_infra.py::test_cronjob_is_valid_and_submits_the_nightly_preset",
                    "tests/test_infra.py::test_manifest_overrides_compose_into_the_typed_config")),
    ".venv/bin/python -m pipeline.verify run_id=mine": Run(
        "verify", expect=(r"verify .*/out/mine: OK: [1-9]\d* committed shard\(s\)",), after=("mine",)),
    ".venv/bin/python -m pipeline.outputs.postprocess run_id=mine": Run(
        "postprocess",
        outputs=("out/mine/latent_stats/hookpoint=layers.12/part-0.parquet",
                 "out/mine/by_latent/hookpoint=layers.12/bucket=*/part-0.parquet",
                 "out/mine/examples/hookpoint=layers.12/bucket=*/part-0.parquet",
                 "out/mine/logit_effects/hookpoint=layers.12/bucket=*/part-0.parquet"),
        after=("mine",)),
    ".venv/bin/python -m pipeline.outputs.delphi_export run_id=mine out=delphi_cache": Run(
        "delphi-export", outputs=("delphi_cache/layers.12/*.safetensors",), after=("postprocess",)),
    ".venv/bin/python -m pipeline.outputs.browser run_id=mine out=site": Run(
        "browser", outputs=("site/index.html",), after=("postprocess",)),
    ".venv/bin/python -m pipeline.outputs.browser run_id=mine out=site explanations=results/mine": Run(
        "browser-explanations", outputs=("site/index.html",), after=("browser",)),  # + the explanations: test body
}

# Fenced blocks that are not shell commands, by (language, first line).
OTHER_BLOCKS: dict[tuple[str, str], Run | Skip] = {
    ("", "corpus files ─► contexts (tokenize, pack to ctx_len, seq_id) ─► shards of S contexts"): Skip(
        "diagram", "a diagram of the stages, not a command"),
    ("", "{sink}/{run_id}/manifest.json config (no secrets), model + SAE sha256, hookpoints, ctx_len, k,"): Skip(
        "layout", "the output layout, not a command; the keys are pipeline/outputs/layout.py's, read by every reader",
        covered_by=("tests/test_readers.py::test_every_reader_reads_every_column_of_every_table",)),
    ("python", "from sae_harvest_kernels import topk_encode, sparse_decode"): Run("import-kernels", python=True),
    ("sql", "select l.* exclude (filename)"): Skip(
        "duckdb-recipe", "DuckDB SQL, run from README.md over a run with an uncommitted part",
        covered_by=("tests/test_pipeline_e2e.py::test_uncommitted_parts_are_ignored_by_readers",)),
    ("sql", "with ex as (select * from read_parquet('out/demo/examples/hookpoint=layers.12/*/*.parquet')),"): Skip(
        "duckdb-windows", "DuckDB SQL, run from README.md over a real run and compared with the window reader",
        covered_by=("tests/test_example_windows.py::test_readme_duckdb_recipe_gives_the_readers_windows",)),
}


# --- reading README.md --------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str


@dataclass(frozen=True)
class Command:
    key: str  # whitespace collapsed: the table's key
    text: str  # as bash gets it (continuations joined)
    line: int


# An absolute path in a command (not a URL's, not `$PWD/...`, not the rest of a relative path).
ABSOLUTE = re.compile(r"(?<![\w.:/$])/[\w.-]+(?:/[\w.-]+)*")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


def fenced_blocks(markdown: str) -> list[Block]:
    lines = markdown.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        info = m["info"].strip()
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body, j = [], i + 1
        while j < len(lines) and not close.match(lines[j]):
            raw = lines[j]
            body.append(raw[indent:] if raw[:indent].strip() == "" else raw.lstrip())
            j += 1
        assert j < len(lines), f"README.md:{i + 1}: fenced block never closed"
        blocks.append(Block(info.split()[0].lower() if info else "", i + 1, "\n".join(body)))
        i = j + 1
    return blocks


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment: `#` outside quotes, at the start of a word."""
    quote, i = None, 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def shell_commands(block: Block) -> list[Command]:
    out, cur, start = [], "", 0
    for n, raw in enumerate(block.text.splitlines()):
        line = raw.strip()
        if block.lang == "console" and not cur:
            if not line.startswith("$ "):
                continue  # output shown in the block
            line = line[2:]
        if not cur and (not line or line.startswith("#")):
            continue
        line = strip_comment(line)
        if not cur:
            start = block.line + 1 + n
        if line.endswith("\\"):
            cur += line[:-1].rstrip() + " "
            continue
        cur += line
        out.append(Command(" ".join(cur.split()), cur.strip(), start))
        cur = ""
    assert not cur, f"README.md:{start}: a command ends in a line continuation"
    return out


def readme_commands(markdown: str) -> list[Command]:
    return [c for b in fenced_blocks(markdown) if b.lang in SHELL_LANGS for c in shell_commands(b)]


def other_blocks(markdown: str) -> list[tuple[tuple[str, str], Block]]:
    out = []
    for b in fenced_blocks(markdown):
        if b.lang not in SHELL_LANGS:
            first = next((ln for ln in b.text.splitlines() if ln.strip()), "")
            out.append(((b.lang, " ".join(first.split())), b))
    return out


def hydra_keys(args: list[str]) -> set[str]:
    """`key` of each `key=value` / `+key=value` / `--flag=value` argument."""
    return {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}


def coverage_problems(markdown: str) -> list[str]:
    """What keeps a README from being covered: commands without an entry, entries without a command,
    fenced blocks that are neither shell blocks nor listed in OTHER_BLOCKS."""
    problems = []
    commands = readme_commands(markdown)
    for c in commands:
        if c.key not in COMMANDS:
            problems.append(
                f"README.md:{c.line}: no entry for this command in tests/test_readme_commands.py's COMMANDS:\n"
                f"    {c.key}\n  add one, keyed by exactly this text: Run(id, outputs=(the paths it writes, as the "
                "README names them), ...) to run it, or Skip(id, reason, covered_by=(the tests that validate what "
                "it uses,)) if this machine cannot run it")
    keys = {c.key for c in commands}
    problems += [f"COMMANDS entry {e.id!r} has no such command in README.md (changed or removed? update its key):\n"
                 f"    {k}" for k, e in COMMANDS.items() if k not in keys]
    blocks = other_blocks(markdown)
    problems += [f"README.md:{b.line}: a fenced block ({b.lang or 'no language'}) that is not a shell block and has "
                 f"no entry in OTHER_BLOCKS: {key}\n  if it holds commands, mark it ```bash; else add an entry "
                 "saying what covers it" for key, b in blocks if key not in OTHER_BLOCKS]
    problems += [f"OTHER_BLOCKS entry {e.id!r} has no such block in README.md: {k}"
                 for k, e in OTHER_BLOCKS.items() if k not in {key for key, _ in blocks}]
    return problems


def test_every_readme_command_has_an_entry_and_every_entry_a_command():
    text = README.read_text()
    assert len(readme_commands(text)) >= 10, "the README parser found almost no commands: is the rule above still right?"
    problems = coverage_problems(text)
    assert not problems, "\n".join(problems)
    ids = [e.id for e in [*COMMANDS.values(), *OTHER_BLOCKS.values()]]
    assert len(ids) == len(set(ids)), f"entry ids must be unique: {ids}"
    by_id = {e.id: e for e in COMMANDS.values()}
    for entry in COMMANDS.values():
        if isinstance(entry, Run):
            assert all(a in by_id and isinstance(by_id[a], Run) for a in entry.after), (entry.id, entry.after)
            assert not (entry.append or entry.subs) or entry.why, f"{entry.id}: say why it appends or substitutes"


def test_a_new_or_changed_readme_command_fails_the_check():
    """The check can fail: a copy of the README with a command block added, a command edited, and a
    plain block holding a command."""
    text = README.read_text()
    added = text + "\n```bash\n.venv/bin/python -m pipeline experiment=none run_id=new \\\n    corpus.max_tokens=10\n```\n"
    assert coverage_problems(added) == [
        f"README.md:{len(text.splitlines()) + 3}: no entry for this command in tests/test_readme_commands.py's "
        "COMMANDS:\n    .venv/bin/python -m pipeline experiment=none run_id=new corpus.max_tokens=10\n  add one, keyed "
        "by exactly this text: Run(id, outputs=(the paths it writes, as the README names them), ...) to run it, or "
        "Skip(id, reason, covered_by=(the tests that validate what it uses,)) if this machine cannot run it"]
    edited = text.replace("sink.root=$PWD/out", "sink.root=./out")
    new, old = coverage_problems(edited)
    assert new.startswith("README.md:") and "cluster=cpu_cluster run_id=job-demo 'corpus.max_tokens=20000' sink.root=./out\n" in new
    assert old.startswith("COMMANDS entry 'submit' has no such command in README.md")
    plain = text + "\n```\nmake lock\n```\n"
    assert len(coverage_problems(plain)) == 1 and "not a shell block" in coverage_problems(plain)[0]


def test_placeholders_and_appended_settings_are_only_what_the_table_names():
    used = set()
    for cmd in readme_commands(README.read_text()):
        entry = COMMANDS.get(cmd.key)
        if not isinstance(entry, Run):
            continue
        roots = {"/" + p.split("/")[1] for p in ABSOLUTE.findall(cmd.text)}
        unknown = {r for r in roots if r not in PLACEHOLDERS}
        assert not unknown, f"{entry.id}: absolute paths {unknown} in the README command have no PLACEHOLDERS entry"
        used |= roots
        for old, _ in entry.subs:
            assert old in cmd.text, f"{entry.id}: substitution of {old!r}, which its command does not contain"
        clash = hydra_keys(shlex.split(cmd.text)) & hydra_keys(list(entry.append))
        assert not clash, f"{entry.id}: appends {clash}, which its README command sets itself: substitute instead"
    assert used == set(PLACEHOLDERS), f"PLACEHOLDERS no README command uses: {set(PLACEHOLDERS) - used}"


def test_skipped_commands_name_existing_tests_and_files():
    for cmd in readme_commands(README.read_text()):
        entry = COMMANDS.get(cmd.key)  # a command without an entry: the test above
        if not isinstance(entry, Skip):
            continue
        for arg in shlex.split(cmd.text):
            if "/" in arg and not arg.startswith("-") and "://" not in arg:
                assert (ROOT / arg).exists(), f"{entry.id}: {arg} (named in the README command) does not exist"
    for entry in [*COMMANDS.values(), *OTHER_BLOCKS.values()]:
        if isinstance(entry, Skip):
            assert entry.reason
            for ref in entry.covered_by:
                path, _, name = ref.partition("::")
                assert (ROOT / path).is_file(), f"{entry.id}: {path} does not exist"
                assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.MULTILINE), \
                    f"{entry.id}: {ref} does not exist"


def test_parser_rules():
    md = ("text\n```bash\n# a comment\nmake demo    # trailing\n.venv/bin/python -m pipeline a=1 \\\n"
          "    'b=[x # not a comment]'\n```\n  ```sh\n  ray start --head\n  ```\n```console\n$ ls out\nmanifest.json\n```\n"
          "```\nplain\n```\n")
    assert [c.key for c in readme_commands(md)] == [
        "make demo", ".venv/bin/python -m pipeline a=1 'b=[x # not a comment]'", "ray start --head", "ls out"]
    assert [k for k, _ in other_blocks(md)] == [("", "plain")]
    assert readme_commands(md)[1].line == 5


# --- running them -------------------------------------------------------------------------------

def write_corpus(folder: Path, names: tuple[str, ...], docs: int = 24) -> None:
    """A few dozen documents, ~2.5k tokens per file: two full 1024-token contexts (corpus=files' ctx_len),
    which the demo SAE's fit needs."""
    folder.mkdir(parents=True, exist_ok=True)
    for f, name in enumerate(names):
        with open(folder / name, "w") as out:
            for i in range(docs):
                text = " ".join(TEXTS[(i + j + f) % len(TEXTS)] for j in range(3))
                out.write(json.dumps({"text": f"Document {f}.{i}. {text}"}) + "\n")


def fake_fs(root: Path) -> Path:
    """What the README's /models, /saes and /data paths hold, tiny, at the same relative paths."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    from pipeline.sae.sae import SAE, random_sae

    models = root / "models"
    tok = build_tokenizer(models / "llama", TEXTS)
    build_tiny_llama(models / "llama", len(tok), layers=16)
    for seed, (name, cfg_cls, model_cls, kw) in enumerate([
        ("gpt2", GPT2Config, GPT2LMHeadModel, dict(n_embd=32, n_layer=9, n_head=4, n_positions=256)),
        ("pythia-160m/step1000", GPTNeoXConfig, GPTNeoXForCausalLM,
         dict(hidden_size=32, num_hidden_layers=8, num_attention_heads=4, intermediate_size=64)),
        ("pythia-160m/step143000", GPTNeoXConfig, GPTNeoXForCausalLM,
         dict(hidden_size=32, num_hidden_layers=8, num_attention_heads=4, intermediate_size=64)),
    ], start=1):
        folder = models / name
        tok.save_pretrained(str(folder))
        torch.manual_seed(seed)
        ids = dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        model_cls(cfg_cls(vocab_size=len(tok), **ids, **kw)).eval().save_pretrained(str(folder))
    saes = root / "saes"
    random_sae(32, 96, 8, seed=0, hookpoint="layers.12").save(saes / "llama" / "layers.12")
    g = torch.Generator().manual_seed(3)
    SAE(W_enc=torch.randn(96, 64, generator=g) / 8, b_enc=0.1 * torch.randn(96, generator=g),
        W_dec=torch.randn(96, 64, generator=g) / 8, b_dec=0.1 * torch.randn(64, generator=g), k=8,
        kind="crosscoder", inputs=["step1k/layers.6", "step143k/layers.6"]).save(saes / "pythia-xc-l6")
    own = write_own_sae(root / "gpt2-own", 256, 32, 32, hookpoint="layers.8")
    write_openai_sae(saes / "openai/gpt2-small/resid_post_mlp_v5_32k/autoencoders/8.pt", own, k=32)
    write_corpus(root / "data" / "web", ("a.jsonl", "b.jsonl"))
    return root


def workspace(root: Path) -> Path:
    """A fresh clone: this checkout's tracked (and untracked, not ignored) files, and `.venv`."""
    ws = root / "sae-harvest"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.decode().split("\0")):
            src = ROOT / rel
            if src.is_file():
                (ws / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, ws / rel)
    else:  # not a git checkout
        shutil.copytree(ROOT, ws, ignore=shutil.ignore_patterns(".venv*", ".git", "out", ".cache", "outputs",
                                                                 "__pycache__", "*.egg-info", ".*_cache"))
    (ws / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    # The user's own corpus (`data/*.jsonl`) and delphi's output for run `mine` (`results/mine`:
    # explanations/ and scores/<scorer>/, one JSON file per latent, as delphi writes them).
    write_corpus(ws / "data", ("notes.jsonl", "more.jsonl"))
    delphi = ws / "results" / "mine"
    (delphi / "explanations").mkdir(parents=True)
    (delphi / "scores" / "detection").mkdir(parents=True)
    for i in range(DEMO_SAE_LATENTS):
        (delphi / "explanations" / f"layers.12_latent{i}.txt").write_text(json.dumps(f"explained latent {i}"))
        score = [{"activating": True, "prediction": True}, {"activating": False, "prediction": False}]
        (delphi / "scores" / "detection" / f"layers.12_latent{i}.txt").write_text(json.dumps(score))
    return ws


@dataclass
class Session:
    """One user following the README: a fresh clone, a fresh HOME, commands in README order."""
    ws: Path
    env: dict
    values: dict
    logs: Path
    done: dict = field(default_factory=dict)  # id -> (command, returncode, output)

    def command_line(self, cmd: Command, entry: Run) -> str:
        text = cmd.text
        for old, new in entry.subs:
            text = text.replace(old, new.format(**self.values))
        for root in PLACEHOLDERS:
            text = re.sub(rf"(?<![\w.:/$]){re.escape(root)}(?![\w.-])", str(Path(self.values["fs"]) / root[1:]), text)
        left = [p for p in ABSOLUTE.findall(text) if not p.startswith(self.values["tmp"] + "/")]
        assert not left, f"{entry.id}: absolute paths outside the test's folders after substitution: {left}"
        return " ".join([text, *(shlex.quote(a.format(**self.values)) for a in entry.append)])

    def run(self, cmd: Command, entry: Run, by_id: dict) -> tuple[str, int, str]:
        if entry.id in self.done:
            return self.done[entry.id]
        for dep in entry.after:
            dep_cmd, dep_entry = by_id[dep]
            _, rc, _ = self.run(dep_cmd, dep_entry, by_id)
            assert rc == 0, f"{entry.id} comes after {dep}, which failed (see its test)"
        line = [str(self.ws / ".venv/bin/python"), "-c", cmd.text] if entry.python else ["bash", "-c", self.command_line(cmd, entry)]
        log = self.logs / f"{entry.id}.log"
        started = time.time()
        with open(log, "w") as out:  # a file, not a pipe: `ray start` leaves daemons holding its stdout
            env = {k: v for k, v in self.env.items() if k not in entry.unset}
            rc = subprocess.run(line, cwd=self.ws, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=600, check=False, start_new_session=True).returncode
        text = log.read_text(errors="replace")
        print(f"[readme] {entry.id}: exit {rc} in {time.time() - started:.0f}s: {line[-1][:300]}")
        if entry.id == "ray-start" and rc == 0:
            wait_for_dashboard(f"http://127.0.0.1:{self.values['ray_dashboard']}")
        self.done[entry.id] = (line[-1], rc, text)
        return self.done[entry.id]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    fs = fake_fs(tmp / "fs")
    ws = workspace(tmp)
    home = tmp / "home"
    home.mkdir()
    (tmp / "logs").mkdir()
    ray_temp = tempfile.mkdtemp(prefix="rrdm", dir="/tmp")  # short: Ray's socket paths have a length limit
    names = ["ray_gcs", "ray_dashboard", "ray_client", "ray_agent_http", "ray_agent_grpc", "ray_metrics",
             "ray_runtime_env"]
    values = dict(zip(names, free_ports(len(names))), fs=str(fs), ws=str(ws), tmp=str(tmp), ray_temp=ray_temp)
    # A user's shell (tests/test_ray_job.py's user_env: own HOME, venv not on PATH, no RAY_* settings).
    # No RAY_ADDRESS: local runs and post-processing start a Ray of their own even while another
    # instance runs on the machine (a plain ray.init() would join the one started last).
    s = Session(ws, user_env(home), values, tmp / "logs")
    try:
        yield s
    finally:
        stop_ray_session(ray_temp)
        shutil.rmtree(ray_temp, ignore_errors=True)


def entries() -> list[tuple[Command, Run | Skip]]:
    text = README.read_text()
    out = [(c, COMMANDS[c.key]) for c in readme_commands(text) if c.key in COMMANDS]
    for key, b in other_blocks(text):
        if key in OTHER_BLOCKS:
            out.append((Command(" ".join(b.text.split()), b.text, b.line), OTHER_BLOCKS[key]))
    seen, unique = set(), []
    for c, e in out:  # `make demo` is in two blocks: one test
        if e.id not in seen:
            seen.add(e.id)
            unique.append((c, e))
    return unique


ENTRIES = entries()


@pytest.mark.slow
@pytest.mark.parametrize("cmd,entry", [(c, e) for c, e in ENTRIES if isinstance(e, Run)],
                         ids=[e.id for c, e in ENTRIES if isinstance(e, Run)])
def test_readme_command_runs_as_written(cmd, entry, session):
    by_id = {e.id: (c, e) for c, e in ENTRIES}
    line, rc, output = session.run(cmd, entry, by_id)
    assert rc == 0, f"README.md:{cmd.line}: exit status {rc}\n$ {line}\n{output[-5000:]}"
    for pattern in entry.expect:
        assert re.search(pattern, output), f"README.md:{cmd.line}: no {pattern!r} in the output of\n$ {line}\n{output[-4000:]}"
    for pattern in entry.outputs:
        assert list(session.ws.glob(pattern)), f"README.md:{cmd.line}: {pattern} was not written by\n$ {line}\n{output[-3000:]}"
    if entry.id == "browser-explanations":  # delphi's explanations reached the site
        pages = list((session.ws / "site").rglob("*.html")) + list((session.ws / "site").rglob("*.js"))
        assert any("explained latent" in p.read_text(errors="replace") for p in pages), \
            "no explanation from results/mine in the site"
    if entry.id == "submit":  # under the user's folder, where the README says: not in Ray's copy of the code
        manifest = json.loads((session.ws / "out/job-demo/manifest.json").read_text())
        assert manifest["config"]["cluster"]["address"] == "auto" and manifest["status"] == "complete"


@pytest.mark.parametrize("cmd,entry", [(c, e) for c, e in ENTRIES if isinstance(e, Skip) and e.make_target],
                         ids=[e.id for c, e in ENTRIES if isinstance(e, Skip) and e.make_target])
def test_skipped_make_targets_exist(cmd, entry):
    out = subprocess.run(["make", "-n", entry.make_target], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "-m pipeline" in out.stdout or "pytest" in out.stdout, out.stdout
