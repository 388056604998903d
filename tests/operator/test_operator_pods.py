from sarathi_operator.pods import problem


def pod(conditions=(), containers=(), init=()):
    return {"metadata": {"name": "p"}, "status": {
        "conditions": list(conditions), "containerStatuses": list(containers), "initContainerStatuses": list(init)}}


def waiting(name, reason, message=None):
    state = {"reason": reason} | ({"message": message} if message else {})
    return {"name": name, "state": {"waiting": state}}


def test_unschedulable_pods_say_why():
    unscheduled = pod([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}])
    assert problem(unscheduled) == "pod p unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."


def test_waiting_containers_say_why_but_normal_start_up_is_no_problem():
    assert problem(pod(containers=[waiting("engine", "ImagePullBackOff", "not found")])) == (
        "pod p container engine: ImagePullBackOff: not found")
    assert problem(pod(init=[waiting("model-download", "CrashLoopBackOff")])) == (
        "pod p container model-download: CrashLoopBackOff")
    assert problem(pod(containers=[waiting("engine", "ContainerCreating")])) is None
    assert problem(pod([{"type": "PodScheduled", "status": "True"}])) is None
