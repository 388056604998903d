import pytest
from sdeps import make_sdep

from sarathi_operator.spec import Layout, layout, model_source, validate, with_defaults


@pytest.mark.parametrize(
    "tensor, pipeline, per_node, expected",
    [
        (1, 1, 8, Layout(1, 1, 1)),
        (2, 1, 8, Layout(2, 1, 2)),
        (4, 2, 8, Layout(8, 1, 8)),
        (4, 4, 8, Layout(16, 2, 8)),
        (8, 4, 8, Layout(32, 4, 8)),
        (2, 3, 2, Layout(6, 3, 2)),
    ],
)
def test_layout_fills_one_node_or_whole_nodes(tensor, pipeline, per_node, expected):
    assert layout({"tensor": tensor, "pipeline": pipeline, "gpusPerNode": per_node}) == expected


def test_layout_is_multi_pod_only_beyond_one_node():
    assert not layout({"tensor": 8, "pipeline": 1, "gpusPerNode": 8}).multi_pod
    assert layout({"tensor": 8, "pipeline": 2, "gpusPerNode": 8}).multi_pod


def test_model_sources():
    def source(value, **model):
        return model_source("chat", {"name": "m", "source": value, **model})

    assert source("smollm2-135m-instruct").path == "smollm2-135m-instruct"
    assert source("/weights/llama").path == "/weights/llama"
    pvc = source("pvc://models/llama/3-8b")
    assert (pvc.pvc_claim, pvc.path, pvc.hf_repo) == ("models", "/models/llama/3-8b", None)
    assert not pvc.cached and not pvc.downloads_per_pod
    hf = source("hf://HuggingFaceTB/SmolLM2-135M-Instruct", diskSize="1Gi")
    assert (hf.hf_repo, hf.path, hf.pvc_claim, hf.disk_size) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "/models/HuggingFaceTB/SmolLM2-135M-Instruct", None, "1Gi")
    assert hf.downloads_per_pod and not hf.cached
    shared = source("hf://org/m", cache={"claimName": "models"})
    assert (shared.pvc_claim, shared.path) == ("models", "/models/org/m") and shared.cached
    assert source("hf://org/m", cache={"size": "100Gi"}).pvc_claim == "chat-model-cache"


def test_with_defaults_fills_nested_defaults_and_keeps_given_values():
    spec = with_defaults({"engine": {"tokenBudget": 2048}, "parallelism": {"tensor": 2}})
    assert spec["engine"] == {"policy": "sarathi", "tokenBudget": 2048, "dtype": "auto", "extraArgs": []}
    assert spec["parallelism"] == {"tensor": 2, "pipeline": 1, "gpusPerNode": 8}
    assert spec["replicas"] == 1


def test_with_defaults_does_not_share_state_between_calls():
    first = with_defaults({})
    first["engine"]["extraArgs"].append("--x")
    assert with_defaults({})["engine"]["extraArgs"] == []


def test_a_plain_spec_is_valid():
    obj = make_sdep()
    assert validate(obj["metadata"]["name"], obj["spec"]) == []


@pytest.mark.parametrize("name", ["9lives", "Chat", "a" * 58, "chat.v2"])
def test_names_that_cannot_name_a_service_are_rejected(name):
    [problem] = validate(name, make_sdep(name)["spec"])
    assert problem.startswith(f"metadata.name {name!r}")


def test_multi_pod_names_must_leave_room_for_statefulset_pod_labels():
    spec = make_sdep(parallelism={"tensor": 8, "pipeline": 2}, replicas=10)["spec"]
    name = "m" * 49  # "-9" makes 51 characters: fits
    assert validate(name, spec) == []
    [problem] = validate("m" * 51, spec)  # "-9" makes 53
    assert "StatefulSet name" in problem and "exceeds 52" in problem


def test_a_cached_model_leaves_room_for_its_download_jobs_name():
    spec = make_sdep(model={"name": "m", "source": "hf://org/m", "cache": {"claimName": "models"}})["spec"]
    assert validate("m" * 48, spec) == []
    [problem] = validate("m" * 49, spec)  # the Job, <name>-model-<8 hex>, would be 64 characters
    assert "model cache" in problem and "at most 48" in problem
    spec["model"] = {"name": "m", "source": "hf://org/m", "diskSize": "1Gi"}
    assert validate("m" * 49, spec) == [], "no cache, no Job"


def test_extra_args_must_not_set_managed_flags():
    spec = make_sdep(engine={"extraArgs": ["--enable-prefix-caching", "--port=9000", "--token-budget", "64"]})["spec"]
    [problem] = validate("chat", spec)
    assert problem.startswith("spec.engine.extraArgs") and "--port=9000" in problem and "--token-budget" in problem
    assert "--enable-prefix-caching" not in problem


def test_env_must_not_set_reserved_names():
    spec = make_sdep(env=[{"name": "RANK", "value": "3"}, {"name": "HF_TOKEN", "value": "x"}])["spec"]
    assert validate("chat", spec) == ["spec.env must not set RANK: the operator sets them"]


def test_resources_must_not_set_gpus():
    spec = make_sdep(resources={"limits": {"nvidia.com/gpu": 4, "memory": "64Gi"}})["spec"]
    [problem] = validate("chat", spec)
    assert problem.startswith("spec.resources.limits must not set nvidia.com/gpu")


def test_all_problems_are_reported_at_once():
    spec = make_sdep(env=[{"name": "WORLD_SIZE", "value": "2"}], engine={"extraArgs": ["--dtype=float16"]})["spec"]
    assert len(validate("Bad", spec)) == 3


def test_the_image_defaults_to_the_operators_engine_image_and_is_required_without_one():
    raw = {"model": {"name": "m", "source": "smollm2-135m-instruct"}}
    assert with_defaults(raw, "registry.example/engine:2")["image"] == "registry.example/engine:2"
    assert with_defaults({**raw, "image": "mine:1"}, "registry.example/engine:2")["image"] == "mine:1"
    [problem] = validate("chat", with_defaults(raw))
    assert problem.startswith("spec.image is not set and the operator has no default engine image")


def test_pod_labels_and_annotations_must_leave_the_operators_own_alone():
    spec = make_sdep(podLabels={"team": "ml", "serving.sarathi.dev/deployment": "other",
                                "app.kubernetes.io/instance": "x"},
                     podAnnotations={"prometheus.io/scrape": "true", "serving.sarathi.dev/engine-settings": "{}"})["spec"]
    assert validate("chat", spec) == [
        "spec.podLabels must not set app.kubernetes.io/instance, serving.sarathi.dev/deployment: "
        "the operator selects its pods by them",
        "spec.podAnnotations must not set serving.sarathi.dev/engine-settings: "
        "the operator owns the serving.sarathi.dev/ annotations",
    ]


def test_extra_volumes_and_mounts_must_not_collide_with_the_operators():
    spec = make_sdep(
        volumes=[{"name": "model", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}],
        volumeMounts=[{"name": "cache", "mountPath": "/cache"}, {"name": "missing", "mountPath": "/x"},
                      {"name": "cache", "mountPath": "/models/extra"}, {"name": "cache", "mountPath": "/dev"}],
    )["spec"]
    assert validate("chat", spec) == [
        "spec.volumes must not be named model: the operator's own volumes",
        "spec.volumeMounts[1] mounts volume 'missing', which spec.volumes does not define",
        "spec.volumeMounts[2].mountPath '/models/extra' overlaps /models, where the operator mounts its own volume",
        "spec.volumeMounts[3].mountPath '/dev' overlaps /dev/shm, where the operator mounts its own volume",
    ]
