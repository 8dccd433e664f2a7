"""The recipes in cluster/ checked without Docker, Kubernetes or a cloud account.

* Ray cluster launcher configs (cluster/launcher/*.yaml): Ray's own validation, the one `ray up`
  applies (`prepare_config` fills in the provider's defaults, `validate_config` applies
  ray/autoscaler/ray-schema.json); AWS node configs against botocore's EC2 RunInstances model.
* Images: the Dockerfiles' Ray, Python and torch versions, the image tags every recipe names,
  and the check in the launcher's setup commands, against pyproject.toml.
* Kubernetes manifests (cluster/kuberay/, cluster/mlflow/): rendered by a small re-implementation
  of the kustomize features they use (it refuses any other), then every object validated: built-in
  kinds against Kubernetes' JSON schemas (the `kubernetes-validate` package, strict: unknown
  fields are errors), RayCluster / RayJob against the CRD schemas of KubeRay KUBERAY_RELEASE
  (tests/vendor/, unknown fields are errors as with `kubectl apply --validate=strict`).
* Compose file (cluster/mlflow/compose.yaml) against the Compose Specification's schema
  (tests/vendor/compose-go-*/).
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VENDOR = Path(__file__).resolve().parent / "vendor"
KUBERAY_RELEASE = "v1.7.0"
COMPOSE_SCHEMA = VENDOR / "compose-go-v2.13.0" / "compose-spec.json"
KUBERNETES_VERSION = "1.33"  # the Kubernetes release the built-in kinds are validated against
LAUNCHER_CONFIGS = sorted((CLUSTER / "launcher").glob("*.yaml"))
TAG = re.compile(r"^(?P<version>[^-]+)-ray(?P<ray>[0-9.]+)-py(?P<python>\d+\.\d+)-(?P<flavour>cpu|cu\d+)$")


# ---------------------------------------------------------------------------------------------
# what pyproject.toml pins
# ---------------------------------------------------------------------------------------------

def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    for line in pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml has no dependency {name}")


def pinned(name: str) -> str:
    specs = list(requirement(name).specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"pyproject.toml does not pin {name} exactly: {specs}"
    return specs[0].version


PINS = {"version": pyproject()["project"]["version"], "ray": pinned("ray"),
        "ray_extras": sorted(requirement("ray").extras),
        "requires_python": SpecifierSet(pyproject()["project"]["requires-python"])}


# ---------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------

def dockerfile(name: str) -> tuple[dict[str, str], list[str], str]:
    """(ARG defaults, FROM lines, the whole text with continuations joined)."""
    text = (CLUSTER / "docker" / f"{name}.Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    args = {}
    for m in re.finditer(r"^ARG (\w+)=(\"[^\"]*\"|\S+)", joined, re.M):
        args[m[1]] = m[2].strip('"')
    froms = re.findall(r"^FROM (\S+)", joined, re.M)
    return args, froms, joined


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), text)


def ubuntu_python(image: str) -> str:
    """The Python of the Ubuntu release a CUDA image is built on."""
    return {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}[image.rsplit("-", 1)[-1]]


def cuda_flavour(image: str) -> str:
    """nvidia/cuda:13.0.1-devel-ubuntu24.04 -> cu130"""
    major, minor = image.split(":", 1)[1].split("-", 1)[0].split(".")[:2]
    return f"cu{major}{minor}"


IMAGE_ARGS = {name: dockerfile(name)[0] for name in ("cpu", "gpu")}
PYTHON = IMAGE_ARGS["cpu"]["PYTHON_VERSION"]
GPU_FLAVOUR = cuda_flavour(IMAGE_ARGS["gpu"]["CUDA_IMAGE"])


def test_images_install_the_ray_and_python_that_pyproject_pins():
    for name in ("cpu", "gpu"):
        args, froms, text = dockerfile(name)
        assert args["RAY_VERSION"] == PINS["ray"], f"{name}.Dockerfile: Ray {args['RAY_VERSION']}, pyproject {PINS['ray']}"
        installs = re.findall(r'"ray\[([\w,]+)\]==\$\{RAY_VERSION\}"', text)
        assert installs and all(sorted(i.split(",")) == PINS["ray_extras"] for i in installs), \
            f"{name}.Dockerfile does not install ray[{','.join(PINS['ray_extras'])}]"
        assert "assert ray.__version__ == '${RAY_VERSION}'" in text, f"{name}.Dockerfile does not check Ray's version"
        assert Version(args["PYTHON_VERSION"]) in PINS["requires_python"], args["PYTHON_VERSION"]
        assert Version(args["TORCH_VERSION"]) in requirement("torch").specifier, args["TORCH_VERSION"]
        assert '"/opt/diffcraft' in text, f"{name}.Dockerfile does not install diffcraft"
        assert '"psycopg[binary]==' in text, f"{name}.Dockerfile: no PostgreSQL driver for Optuna's storage"
    # Ray refuses nodes of different Python minor versions: both images must have the same one.
    assert IMAGE_ARGS["cpu"]["PYTHON_VERSION"] == IMAGE_ARGS["gpu"]["PYTHON_VERSION"]
    assert IMAGE_ARGS["cpu"]["TORCH_VERSION"] == IMAGE_ARGS["gpu"]["TORCH_VERSION"]
    cpu_from = expand(dockerfile("cpu")[1][0], IMAGE_ARGS["cpu"])
    assert cpu_from.startswith(f"python:{PYTHON}-"), cpu_from
    gpu_from = expand(dockerfile("gpu")[1][0], IMAGE_ARGS["gpu"])
    assert gpu_from.startswith("nvidia/cuda:") and "-devel-" in gpu_from, "mamba-ssm is compiled: a CUDA devel image"
    assert ubuntu_python(gpu_from) == IMAGE_ARGS["gpu"]["PYTHON_VERSION"], gpu_from
    gpu_text = dockerfile("gpu")[2]
    assert "bash /opt/build/build-mamba-ssm.sh" in gpu_text and 'MAMBA_CUDA_ARCHS="${MAMBA_CUDA_ARCHS}"' in gpu_text
    assert "import torch, selective_scan_cuda" in (CLUSTER / "docker" / "build-mamba-ssm.sh").read_text(), \
        "the mamba-ssm build must fail unless its kernel imports"
    assert "download.pytorch.org/whl/cpu" in dockerfile("cpu")[2], "the CPU image keeps torch's CPU build"


GPU_ARCHS = {"gpu-a100": "80", "gpu-l4": "89", "gpu-h100": "90"}  # KubeRay components -> compute capability


def test_the_gpu_image_compiles_mamba_ssm_for_every_gpu_the_recipes_use():
    components = {p.name for p in (CLUSTER / "kuberay" / "components").glob("gpu-*")}
    assert components == set(GPU_ARCHS), f"a GPU component without a known architecture: {components}"
    default = IMAGE_ARGS["gpu"]["MAMBA_CUDA_ARCHS"].split(";")
    assert set(GPU_ARCHS.values()) <= set(default), default
    ignored = (CLUSTER / "docker" / "gpu.Dockerfile.dockerignore").read_text().splitlines()
    for script in ("build-mamba-ssm.sh", "mamba_ssm_archs.py"):
        assert f"!cluster/docker/{script}" in ignored, f"{script} is not sent to the GPU image's build"


def test_mamba_ssm_builds_only_the_architectures_named():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mamba_ssm_archs", CLUSTER / "docker" / "mamba_ssm_archs.py")
    archs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archs)
    setup_py = ('if True:  # the shape of its CUDA branch\n    cc_flag = []\n    cc_flag.append("-gencode")\n'
                '    cc_flag.append("arch=compute_75,code=sm_75")\n'
                "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI is set to be the same as\n")
    scope: dict = {}
    exec(archs.with_archs(setup_py, "80;90"), scope)
    assert scope["cc_flag"] == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    with pytest.raises(ValueError, match="layout of mamba-ssm"):
        archs.with_archs("cc_flag = []\n", "90")
    with pytest.raises(ValueError, match="without the dot"):
        archs.with_archs(setup_py, "9.0")


def test_the_mlflow_image_installs_an_mlflow_that_pyproject_accepts():
    args, froms, text = dockerfile("mlflow")
    assert "pip install -r /opt/mlflow/requirements.txt" in text
    reqs = [Requirement(line) for line in (CLUSTER / "mlflow" / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    mlflow = next(r for r in reqs if r.name == "mlflow")
    assert "auth" in mlflow.extras, "basic-auth needs mlflow[auth]"
    (spec,) = list(mlflow.specifier)
    assert spec.operator == "==" and Version(spec.version) in requirement("mlflow").specifier
    assert {r.name for r in reqs} >= {"mlflow", "psycopg", "boto3"}
    for script in ("serve.py", "backup.py", "postgres-init.sh"):
        assert f"cluster/mlflow/{script}" in text


def check_image(ref: str, where: str) -> str:
    """A diffcraft image reference: its tag agrees with pyproject.toml and the Dockerfiles.
    Returns the flavour (cpu / cuXYZ)."""
    name, tag = ref.rsplit(":", 1)
    assert name.endswith("/diffcraft"), f"{where}: {ref} is not a diffcraft image"
    m = TAG.match(tag)
    assert m, f"{where}: tag {tag!r} is not <version>-ray<Ray>-py<Python>-<cpu|cuXYZ>"
    assert m["version"] == PINS["version"], f"{where}: diffcraft {m['version']}, pyproject {PINS['version']}"
    assert m["ray"] == PINS["ray"], f"{where}: Ray {m['ray']}, pyproject {PINS['ray']}"
    assert m["python"] == PYTHON, f"{where}: Python {m['python']}, the Dockerfiles {PYTHON}"
    assert m["flavour"] in ("cpu", GPU_FLAVOUR), f"{where}: {m['flavour']}, the GPU Dockerfile builds {GPU_FLAVOUR}"
    return m["flavour"]


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher
# ---------------------------------------------------------------------------------------------

def launcher(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before it talks to any cloud: fill in the provider's
    defaults, then validate against Ray's cluster-config schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_there_are_launcher_configs_for_aws_gcp_and_a_lab():
    assert {p.stem for p in LAUNCHER_CONFIGS} == {"aws", "gcp", "onprem"}
    assert {launcher(p)["provider"]["type"] for p in LAUNCHER_CONFIGS} == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.stem)
def test_launcher_config_passes_rays_own_validation(path):
    prepared = ray_validate(launcher(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # The validation is real: the same config with one misspelt key is refused.
    broken = launcher(path)
    broken["docker"]["run_option"] = broken["docker"].pop("run_options")
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(broken)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.stem)
def test_launcher_config_images_and_setup_agree_with_pyproject(path):
    config = launcher(path)
    docker = config["docker"]
    assert check_image(docker["head_image"], f"{path.name} head_image") == "cpu"
    assert check_image(docker["worker_image"], f"{path.name} worker_image") == GPU_FLAVOUR
    for name, node in config.get("available_node_types", {}).items():
        image = node.get("docker", {}).get("worker_image")
        if image:
            check_image(image, f"{path.name} {name}")
    check = [c for c in config["setup_commands"] if "ray.__version__" in c]
    assert check and f"ray.__version__ == '{PINS['ray']}'" in check[0], f"{path.name}: setup_commands do not check Ray {PINS['ray']}"
    assert not [c for c in config["setup_commands"] + config.get("head_setup_commands", []) +
                config.get("worker_setup_commands", []) if re.search(r"pip install", c)], \
        f"{path.name}: setup commands install packages; the images hold them"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.stem)
def test_launcher_config_starts_every_node_with_the_ray_token(path):
    config = launcher(path)
    mounts = config["file_mounts"]
    token_paths = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert len(start) == 1, f"{path.name} {key}"
        assert "RAY_AUTH_MODE=token" in start[0], f"{path.name} {key} starts Ray without token authentication"
        token_paths |= set(re.findall(r"RAY_AUTH_TOKEN_PATH=(\S+)", start[0]))
    assert len(token_paths) == 1, token_paths
    (token_path,) = token_paths
    folder = token_path.replace("$HOME", "~").rsplit("/", 1)[0]
    assert folder in mounts, f"{path.name}: the token {token_path} is not in a file mount ({list(mounts)})"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head_start, "the Jobs API must be reachable for `diffcraft study submit`"


@pytest.mark.parametrize("path", [p for p in LAUNCHER_CONFIGS if launcher(p)["provider"]["type"] != "local"],
                         ids=lambda p: p.stem)
def test_cloud_config_head_runs_drivers_and_workers_scale_from_zero_on_spot(path):
    config = launcher(path)
    provider = config["provider"]["type"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "no trial may land on the head"
    assert any("--shm-size" in o for o in config["docker"]["head_run_options"])
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any(t["resources"].get("GPU") for t in workers.values()), f"{path.name} has no GPU worker type"
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{path.name} {name} does not scale from zero"
        options = t.get("docker", {}).get("worker_run_options", [])
        assert any(o.startswith("--shm-size=") for o in options), f"{path.name} {name}: no shared memory size"
        image = t.get("docker", {}).get("worker_image", config["docker"]["worker_image"])
        if t["resources"].get("GPU"):
            assert "--gpus all" in options and image.endswith(GPU_FLAVOUR), f"{path.name} {name}"
        else:
            assert image.endswith("-cpu"), f"{path.name} {name}: CPU workers use the CPU image"
        node = t["node_config"]
        if provider == "aws":
            assert node["InstanceMarketOptions"]["MarketType"] == "spot", f"{path.name} {name}"
        else:
            assert node["scheduling"]["provisioningModel"] == "SPOT", f"{path.name} {name}"


def test_aws_node_configs_are_valid_run_instances_requests_with_instance_profiles():
    """What Ray hands to EC2's RunInstances (plus MinCount/MaxCount), checked against botocore's
    EC2 service model, and the instance profiles against the IAM policies shipped beside it."""
    import botocore.session
    from botocore.validate import ParamValidator

    ec2 = botocore.session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    instance_types = set(ec2.shape_for("InstanceType").enum)
    config = launcher(CLUSTER / "launcher" / "aws.yaml")
    profiles = {}
    for name, t in config["available_node_types"].items():
        node = t["node_config"]
        report = ParamValidator().validate({**node, "MinCount": 1, "MaxCount": 1}, shape)
        assert not report.has_errors(), f"aws.yaml {name}: {report.generate_report()}"
        assert node["InstanceType"] in instance_types, f"aws.yaml {name}: unknown instance type {node['InstanceType']}"
        profiles[name] = node["IamInstanceProfile"]["Arn"]
    head_profile = profiles.pop(config["head_node_type"])
    assert head_profile.endswith("/diffcraft-ray-head") and set(profiles.values()) == {
        head_profile.replace("diffcraft-ray-head", "diffcraft-ray-worker")}
    policies = {who: json.loads((CLUSTER / "launcher" / f"aws-{who}-policy.json").read_text()) for who in ("head", "worker")}
    for who, policy in policies.items():
        assert policy["Version"] == "2012-10-17" and all(s["Effect"] == "Allow" for s in policy["Statement"])
    pass_role = [s for s in policies["head"]["Statement"] if "iam:PassRole" in s["Action"]][0]
    assert next(iter(profiles.values())) in pass_role["Resource"], "the head may not launch workers with their profile"
    bucket = study_bucket()
    for who, policy in policies.items():
        resources = {r for s in policy["Statement"] for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
        assert {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"} <= resources, f"{who} policy misses the study bucket"


def test_onprem_nodes_read_their_own_credentials_before_ray_start():
    config = launcher(CLUSTER / "launcher" / "onprem.yaml")
    assert config["file_mounts"]["~/.diffcraft-env"] == "~/.diffcraft/cluster-env"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = config[key][-1]
        assert start.index(". ~/.diffcraft-env/cluster.env") < start.index("ray start"), start
        assert "set -a" in start  # exported, so Ray's processes inherit them


def test_onprem_config_lists_the_lab_machines():
    config = launcher(CLUSTER / "launcher" / "onprem.yaml")
    prepared = ray_validate(config)
    assert config["provider"]["head_ip"] and len(config["provider"]["worker_ips"]) >= 1
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"]), "no trial may land on the head"
    assert any(o.startswith("--shm-size=") for o in config["docker"]["run_options"])


# ---------------------------------------------------------------------------------------------
# the cluster study file
# ---------------------------------------------------------------------------------------------

STUDY = CLUSTER / "studies" / "decoder_ablation_s3.yaml"


def study_bucket() -> str:
    return yaml.safe_load(STUDY.read_text())["storage"].split("/")[2]


def test_the_cluster_study_keeps_everything_in_the_bucket_and_logs_to_a_server():
    raw = yaml.safe_load(STUDY.read_text())
    bucket = study_bucket()
    assert raw["storage"].startswith(f"s3://{bucket}/") and raw["run"]["data"]["cache"].startswith(f"s3://{bucket}/")
    assert raw["mlflow"]["tracking_uri"].startswith(("http://", "https://"))
    assert not re.search(r"(password|secret|token|key)\s*[:=]", STUDY.read_text(), re.I), "no secret in a study file"
    assert raw["resources"]["gpus_per_worker"] >= 1 and raw["max_retries"] >= 1


def test_the_cluster_study_file_is_a_valid_study():
    from diffcraft.study.studyfile import load_study

    study = load_study(STUDY)
    assert study.storage == "s3://diffcraft-studies/studies"


# ---------------------------------------------------------------------------------------------
# Kubernetes: a small kustomize
# ---------------------------------------------------------------------------------------------

KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources", "components", "patches", "images",
                    "configMapGenerator"}


def json_pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902: add, remove, replace, test (what the kustomizations use)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = json_pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del node[index]
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "test":
                assert node[index] == op["value"], f"JSON patch test failed at {op['path']}: {node[index]!r}"
            else:
                raise AssertionError(f"JSON patch op {kind} not supported here")
        else:
            if kind in ("remove", "replace", "test"):
                assert last in node, f"JSON patch {kind}: no {op['path']}"
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            elif kind == "test":
                assert node[last] == op["value"], f"JSON patch test failed at {op['path']}: {node[last]!r}"
            else:
                raise AssertionError(f"JSON patch op {kind} not supported here")
    return doc


def selects(target: dict, obj: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return all([target.get("group", group) == group, target.get("version", version) == version,
                target.get("kind", obj["kind"]) == obj["kind"],
                target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]])


def set_images(node, images: dict[str, dict]) -> None:
    """kustomize's `images:`: every `image` of an item of a `containers` / `initContainers` list."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name = re.split(r"[:@]", container.get("image", ""), maxsplit=1)[0]
                    if name in images:
                        new = images[name]
                        container["image"] = f"{new.get('newName', name)}:{new['newTag']}"
            set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            set_images(item, images)


LOADED: set[Path] = set()  # every manifest file a kustomize() call has read


def kustomize(folder: Path) -> list[dict]:
    """`kustomize build folder` for the features these recipes use; any other field fails."""
    folder = folder.resolve()
    LOADED.add(folder / "kustomization.yaml")
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert spec["kind"] in ("Kustomization", "Component"), folder
    unknown = set(spec) - KUSTOMIZE_FIELDS
    assert not unknown, f"{folder}/kustomization.yaml: {sorted(unknown)} not supported by the test's kustomize"
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if not path.is_dir():
            LOADED.add(path)
        objects += kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in spec.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files", "options"} and gen["options"] == {"disableNameSuffixHash": True}, gen
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                        "data": {Path(f).name: (folder / f).read_text() for f in gen["files"]}})
    for entry in spec.get("components", []):
        objects = component(folder / entry, objects)
    return transform(spec, folder, objects)


def component(folder: Path, objects: list[dict]) -> list[dict]:
    folder = folder.resolve()
    LOADED.add(folder / "kustomization.yaml")
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component" and not spec.get("resources"), folder
    assert not set(spec) - KUSTOMIZE_FIELDS, folder
    return transform(spec, folder, objects)


def transform(spec: dict, folder: Path, objects: list[dict]) -> list[dict]:
    for patch in spec.get("patches", []):
        assert set(patch) == {"target", "patch"}, f"{folder}: only inline JSON 6902 patches with a target"
        ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), f"{folder}: only JSON 6902 patches"
        objects = [apply_json_patch(o, ops) if selects(patch["target"], o) else o for o in objects]
    images = {i["name"]: i for i in spec.get("images", [])}
    for obj in objects:
        set_images(obj, images)
        if spec.get("namespace"):
            obj["metadata"]["namespace"] = spec["namespace"]
    return objects


# ---------------------------------------------------------------------------------------------
# Kubernetes: validation
# ---------------------------------------------------------------------------------------------

def strict_crd_schema(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema that refuses unknown fields (the API server prunes
    them silently; `kubectl apply --validate=strict` refuses them) and accepts `nullable` nulls."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            if node.pop("nullable", False) and "type" in node:
                node["type"] = [node["type"], "null"]
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def cel_guarded_paths(schema: dict, instance, path: str = "") -> list[str]:
    """Paths present in `instance` whose schema carries CEL rules (x-kubernetes-validations),
    which only the API server evaluates."""
    found = [path] if isinstance(schema, dict) and schema.get("x-kubernetes-validations") else []
    if isinstance(instance, dict):
        for key, value in instance.items():
            sub = schema.get("properties", {}).get(key)
            if sub is not None:
                found += cel_guarded_paths(sub, value, f"{path}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            found += cel_guarded_paths(schema["items"], value, f"{path}[{i}]")
    return found


def crd_validator(kind: str) -> tuple[jsonschema.protocols.Validator, dict]:
    doc = json.loads((VENDOR / f"kuberay-{KUBERAY_RELEASE}" / f"{kind}.ray.io.v1.json").read_text())
    schema = strict_crd_schema(doc["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema), doc["openAPIV3Schema"]


CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}


def validate_object(obj: dict, where: str) -> None:
    if obj["apiVersion"] == "ray.io/v1":
        validator, raw = crd_validator(CRDS[obj["kind"]])
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, f"{where}: {obj['kind']} {obj['metadata']['name']} vs KubeRay {KUBERAY_RELEASE}: " + \
            "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        assert not cel_guarded_paths(raw, obj), f"{where}: fields with CEL rules this test cannot check: " \
                                                f"{cel_guarded_paths(raw, obj)}"
        for template in pod_templates(obj):
            k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                         f"{where}: {obj['kind']} pod template")
    else:
        k8s_validate(obj, where)


def k8s_validate(obj: dict, where: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{where}: {obj['kind']} {obj['metadata'].get('name')}: "
                             f"{'.'.join(map(str, e.path))}: {e.message}") from None


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict) -> list[dict]:
    spec = cluster_spec(obj)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


KUBERAY_BUILDS = ["base", "job", *[f"overlays/{p.name}" for p in sorted((CLUSTER / "kuberay" / "overlays").iterdir())]]


@pytest.mark.parametrize("build", KUBERAY_BUILDS)
def test_kuberay_manifests_validate_against_kubernetes_and_the_kuberay_crds(build):
    objects = kustomize(CLUSTER / "kuberay" / build)
    kinds = {o["kind"] for o in objects}
    assert kinds & {"RayCluster", "RayJob"}, build
    for obj in objects:
        validate_object(obj, f"cluster/kuberay/{build}")


MLFLOW_BUILDS = [".", "with-minio"]


def test_every_kubernetes_file_is_part_of_a_validated_build():
    for build in KUBERAY_BUILDS:
        kustomize(CLUSTER / "kuberay" / build)
    for build in MLFLOW_BUILDS:
        kustomize(CLUSTER / "mlflow" / build)
    files = {p.resolve() for folder in (CLUSTER / "kuberay", CLUSTER / "mlflow")
             for p in folder.rglob("*.yaml") if p.name != "compose.yaml"}
    assert not files - LOADED, f"not rendered by any build, so never validated: {sorted(map(str, files - LOADED))}"


def test_crd_validation_refuses_a_misspelt_field():
    (cluster,) = [o for o in kustomize(CLUSTER / "kuberay" / "base") if o["kind"] == "RayCluster"]
    validate_object(cluster, "as shipped")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(AssertionError, match="maxReplica"):
        validate_object(cluster, "misspelt")


@pytest.mark.parametrize("build", KUBERAY_BUILDS)
def test_kuberay_cluster_has_a_cpu_head_gpu_autoscaling_shm_and_token_auth(build):
    for obj in kustomize(CLUSTER / "kuberay" / build):
        if obj["kind"] not in CRDS:
            continue
        spec = cluster_spec(obj)
        assert spec["rayVersion"] == PINS["ray"]
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"] == {"mode": "token", "secretName": "diffcraft-ray-token"}
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert check_image(head["template"]["spec"]["containers"][0]["image"], build) == "cpu"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu = groups["gpu"]
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
        pod = gpu["template"]["spec"]
        (container,) = pod["containers"]
        assert check_image(container["image"], build) == GPU_FLAVOUR
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        for template in pod_templates(obj):
            for c in template["spec"]["containers"]:
                check_image(c["image"], f"{build} {c['name']}")
            mounts = {m["mountPath"]: m["name"] for c in template["spec"]["containers"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", build
            env_from = [e["secretRef"]["name"] for c in template["spec"]["containers"] for e in c.get("envFrom", [])]
            assert "diffcraft-mlflow-client" in env_from, "MLflow credentials come from a Secret"
        if build.startswith("overlays/"):
            assert pod["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-"), build


def test_the_rayjob_runs_the_study_so_that_a_retry_resumes_it():
    (job,) = [o for o in kustomize(CLUSTER / "kuberay" / "job") if o["kind"] == "RayJob"]
    (cluster,) = [o for o in kustomize(CLUSTER / "kuberay" / "base") if o["kind"] == "RayCluster"]
    spec = job["spec"]
    command = shlex.split(spec["entrypoint"])
    # `diffcraft study run FILE` continues a study that exists in its storage: a retry resumes it,
    # taking over the lease of the driver that died with the old head once it has gone stale.
    assert command[:3] == ["diffcraft", "study", "run"] and command[4:] == ["--take-over"], spec["entrypoint"]
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    study_dir = str(Path(command[3]).parent)
    volume = next(v for v in head["volumes"] if v["name"] == mounts[study_dir])
    assert volume["configMap"]["name"] == "diffcraft-study"
    # Apart from the study file, the job's cluster is the long-lived cluster's.
    same = copy.deepcopy(spec["rayClusterSpec"])
    same_head = same["headGroupSpec"]["template"]["spec"]
    same_head["volumes"] = [v for v in same_head["volumes"] if v["name"] != mounts[study_dir]]
    same_head["containers"][0]["volumeMounts"] = [m for m in same_head["containers"][0]["volumeMounts"]
                                                  if m["mountPath"] != study_dir]
    assert same == cluster["spec"]


# ---------------------------------------------------------------------------------------------
# team MLflow: Kubernetes and Compose
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", MLFLOW_BUILDS)
def test_mlflow_kubernetes_manifests_validate_against_kubernetes(build):
    objects = kustomize((CLUSTER / "mlflow" / build).resolve())
    assert {o["kind"] for o in objects} >= {"Deployment", "StatefulSet", "Service", "CronJob", "ConfigMap"}
    for obj in objects:
        validate_object(obj, f"cluster/mlflow/{build}")
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    broken = copy.deepcopy(by_name[("Deployment", "mlflow")])
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicie"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolicie"):
        validate_object(broken, "misspelt")
    init = by_name[("ConfigMap", "mlflow-postgres-init")]["data"]["postgres-init.sh"]
    assert init == (CLUSTER / "mlflow" / "postgres-init.sh").read_text()
    pod = by_name[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    assert migrate["args"][-1] == "migrate" and pod["containers"][0]["args"] == ["serve"]
    assert by_name[("Deployment", "mlflow")]["spec"]["strategy"]["type"] == "Recreate"
    assert migrate["env"] == pod["containers"][0]["env"]
    for container in (migrate, pod["containers"][0]):
        assert container["image"] == "registry.example.org/diffcraft-mlflow:" + mlflow_image_tag()
    if build == "with-minio":
        assert migrate["args"] == ["bucket", "migrate"] and ("StatefulSet", "minio") in by_name


def mlflow_image_tag() -> str:
    reqs = (CLUSTER / "mlflow" / "requirements.txt").read_text()
    return re.search(r"^mlflow\[auth\]==(\S+)", reqs, re.M)[1]


def compose() -> dict:
    return yaml.safe_load((CLUSTER / "mlflow" / "compose.yaml").read_text())


def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(compose()))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
    broken = compose()
    broken["services"]["mlflow"]["port"] = broken["services"]["mlflow"].pop("ports")
    assert list(validator.iter_errors(broken)), "the schema check must refuse a misspelt key"


def test_compose_stack_runs_the_scripts_the_team_mlflow_test_runs():
    services = compose()["services"]
    assert services["mlflow-migrate"]["command"] == ["bucket", "migrate"]
    assert services["mlflow"]["command"] == ["serve"]
    assert services["mlflow"]["depends_on"]["mlflow-migrate"]["condition"] == "service_completed_successfully"
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/10-diffcraft.sh:ro" in services["postgres"]["volumes"]
    assert "backup.py dump" in services["backup"]["command"][0]
    default_image = re.fullmatch(r"\$\{MLFLOW_IMAGE:-(\S+)\}", services["mlflow"]["image"])[1]
    assert default_image.endswith(":" + mlflow_image_tag()), default_image
    # Every variable the file reads is documented in the example .env.
    used = set(re.findall(r"\$\{(\w+)", (CLUSTER / "mlflow" / "compose.yaml").read_text()))
    documented = set(re.findall(r"^#?\s*(\w+)=", (CLUSTER / "mlflow" / "team.env.example").read_text(), re.M))
    assert used <= documented, f"not in team.env.example: {sorted(used - documented)}"


def test_the_team_server_recipes_speak_tls_bind_loopback_and_give_each_service_only_its_secrets():
    services = compose()["services"]
    mlflow = services["mlflow"]
    assert mlflow["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]
    assert mlflow["environment"]["MLFLOW_TLS_CERT"] and mlflow["depends_on"]["mlflow-cert"]
    assert services["mlflow-cert"]["command"] == ["cert"] and "https://" in mlflow["healthcheck"]["test"][-1]
    for name, service in services.items():
        env = service.get("environment", {})
        assert ("OPTUNA_STORAGE" in env) == (name == "backup"), name  # only the backup dumps Optuna's database
        assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in env or name.startswith("mlflow"), name
    objects = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(CLUSTER / "mlflow")}
    pod = objects[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    names = {e["name"] for c in pod["containers"] + pod["initContainers"] for e in c.get("env", [])}
    assert not {n for n in names if n.startswith("OPTUNA")}, names
    (tls,) = objects[("Ingress", "mlflow")]["spec"]["tls"]
    assert tls["secretName"] == "mlflow-tls"
    assert objects[("ConfigMap", "mlflow-settings")]["data"]["MLFLOW_PLAIN_HTTP_BEHIND_TLS"] == "1"


# ---------------------------------------------------------------------------------------------
# the runbook
# ---------------------------------------------------------------------------------------------

def test_the_runbook_starts_with_the_cluster_check_and_names_every_recipe():
    text = (CLUSTER / "README.md").read_text()
    assert "diffcraft cluster check --address http://" in text
    for path in [*LAUNCHER_CONFIGS, STUDY, CLUSTER / "mlflow" / "compose.yaml", *(CLUSTER / "docker").glob("*.Dockerfile")]:
        assert str(path.relative_to(ROOT)) in text, f"cluster/README.md does not mention {path.relative_to(ROOT)}"
    assert KUBERAY_RELEASE in text and "not run here" in text
