"""Static lint of the Dockerfiles (no Docker engine here): every COPY source exists and is inside the build
context, base images are pinned by tag, the final stage runs as a non-root user, torch is pinned exactly."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "gateway": ROOT / "api_gateway" / "Dockerfile",
    "operator": ROOT / "operator" / "Dockerfile",
    "trainer": ROOT / "trainer_pod" / "Dockerfile",
}
TORCH_VERSION = "2.13.0"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return lines


def parse(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif op == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, line
            stages.append(Stage(m.group(1), m.group(2)))
        else:
            assert stages, f"{path}: {op} before FROM"
            stages[-1].instructions.append((op, rest))
    return Dockerfile(args, stages)


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def dockerignore_allows(rel: str) -> bool:
    """Last matching pattern wins; `!` re-includes (Docker's semantics, enough for our patterns)."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        candidates = [pattern, pattern.removesuffix("/**")]
        if any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.replace("**/", "")) for p in candidates):
            allowed = negate
    return allowed


@pytest.fixture(params=sorted(DOCKERFILES), scope="module")
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    return request.param, parse(DOCKERFILES[request.param])


def test_every_copy_source_exists_in_the_build_context(dockerfile: tuple[str, Dockerfile]) -> None:
    name, df = dockerfile
    missing = []
    for stage in df.stages:
        for op, rest in stage.instructions:
            if op not in ("COPY", "ADD") or "--from=" in rest:
                continue
            parts = [p for p in rest.split() if not p.startswith("--")]
            for src in parts[:-1]:
                path = ROOT / src
                if not path.exists():
                    missing.append(f"{src} (missing)")
                elif path.is_file() and not dockerignore_allows(src):
                    missing.append(f"{src} (excluded by .dockerignore)")
                elif path.is_dir() and not any(
                    dockerignore_allows(str(f.relative_to(ROOT))) for f in path.rglob("*.py")
                ):
                    missing.append(f"{src}/ (every file excluded by .dockerignore)")
    assert not missing, f"{name}: {missing}"


def test_base_images_are_pinned_by_tag(dockerfile: tuple[str, Dockerfile]) -> None:
    name, df = dockerfile
    stage_names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        base = expand(stage.base, df.args)
        if base in stage_names:  # e.g. base-${VARIANT} → base-cuda: an earlier stage, pinned there
            continue
        image, _, tag = base.rpartition(":")
        assert image and tag and tag != "latest" and "/" not in tag, f"{name}: base {base!r} is not pinned by tag"
        assert re.search(r"\d+\.\d+", tag), f"{name}: base {base!r} should pin a version, not a moving tag"


def test_final_stage_runs_as_a_non_root_user(dockerfile: tuple[str, Dockerfile]) -> None:
    name, df = dockerfile
    users = [rest.strip() for op, rest in df.final.instructions if op == "USER"]
    assert users, f"{name}: the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), f"{name}: USER {users[-1]}"


def test_final_stage_copies_no_build_tree(dockerfile: tuple[str, Dockerfile]) -> None:
    # Multi-stage: the runtime gets the venv (and baked models), never the source tree or the pip cache.
    name, df = dockerfile
    assert len(df.stages) >= 2, f"{name} is not multi-stage"
    copies = [rest for op, rest in df.final.instructions if op == "COPY"]
    assert copies and all("--from=" in c for c in copies), f"{name}: {copies}"


def test_pip_installs_keep_no_cache(dockerfile: tuple[str, Dockerfile]) -> None:
    name, df = dockerfile
    for stage in df.stages:
        for op, rest in stage.instructions:
            if op == "RUN" and "pip install" in rest:
                assert "--no-cache-dir" in rest, f"{name}: {rest}"


def test_trainer_pins_torch_exactly_and_installs_it_first() -> None:
    df = parse(DOCKERFILES["trainer"])
    assert df.args["TORCH_VERSION"] == TORCH_VERSION
    build = next(s for s in df.stages if s.name == "build")
    runs = [rest for op, rest in build.instructions if op == "RUN" and "pip install" in rest]
    assert '"torch==${TORCH_VERSION}"' in runs[0], "torch must be the first pip install, pinned exactly"
    assert any("[trainer]" in r for r in runs[1:])


def test_trainer_cpu_variant_uses_the_cpu_wheel_index() -> None:
    df = parse(DOCKERFILES["trainer"])
    cpu = next(s for s in df.stages if s.name == "base-cpu")
    env = " ".join(rest for op, rest in cpu.instructions if op == "ENV")
    assert "download.pytorch.org/whl/cpu" in env
    assert {s.name for s in df.stages} >= {"base-cpu", "base-cuda", "build", "runtime"}
    assert "cuda" in expand(df.args["CUDA_BASE_IMAGE"], df.args)


@pytest.mark.parametrize(("component", "module"), [("gateway", "tinkerkube_gateway.main"),
                                                   ("operator", "tinkerkube_operator.main"),
                                                   ("trainer", "tinkerkube_trainer.main")])
def test_image_command_runs_the_component_entry_point(component: str, module: str) -> None:
    df = parse(DOCKERFILES[component])
    cmd = [rest for op, rest in df.final.instructions if op in ("CMD", "ENTRYPOINT")][-1]
    assert module in cmd


def test_dockerignore_keeps_the_context_small() -> None:
    assert not dockerignore_allows(".venv/bin/python")
    assert not dockerignore_allows("tools/helm/helm")
    assert not dockerignore_allows(".git/HEAD")
    assert dockerignore_allows("pyproject.toml")
    assert dockerignore_allows("crds/tinkerkube_contract/resource.py")


# --- every image installs what its code imports -------------------------------------------------------
EXTRA_OF = {"gateway": ("api_gateway/tinkerkube_gateway", "gateway"),
            "operator": ("operator/tinkerkube_operator", "operator"),
            "trainer": ("trainer_pod/tinkerkube_trainer", "trainer")}


def _third_party_imports(package: Path) -> set[str]:
    import ast
    import sys

    found: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and not m.startswith("tinkerkube_")}


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names reachable from these requirement strings (markers for extras we do not ask ignored)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        for raw in dist.requires or []:
            sub = Requirement(raw)
            wanted = any(sub.marker is None or sub.marker.evaluate({"extra": e}) for e in ("", *req.extras))
            if wanted and (sub.marker is None or "extra" not in str(sub.marker) or req.extras):
                todo.append(sub)
    return seen


@pytest.mark.parametrize("component", sorted(EXTRA_OF))
def test_the_image_installs_every_distribution_the_code_imports(component: str) -> None:
    import tomllib
    from importlib import metadata

    folder, extra = EXTRA_OF[component]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _closure(project["dependencies"] + project["optional-dependencies"][extra])
    providers = metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports(ROOT / folder) | _third_party_imports(ROOT / "crds/tinkerkube_contract")):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, f"the {component} image (pip install '.[{extra}]') lacks {missing}"
