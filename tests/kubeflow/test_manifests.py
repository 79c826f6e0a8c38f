"""Kubernetes manifests: every overlay renders with ``kubectl kustomize`` and every object validates strictly.

Schema validation only (kubernetes-validate); no admission, quota or scheduling, which need a cluster. A few
checks the schema cannot make (toleration enums, quantities, placeholders in Secrets, names shared with the
pipeline profiles) are asserted directly.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

from pipelines import load_profiles  # noqa: E402

MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
BIN = Path(sys.executable).parent
K8S_VERSION = "1.33.0"
PLACEHOLDER = re.compile(r"^REPLACE_ME$")


def render(overlay: str, tmp_path: Path) -> list[dict]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("")
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(MANIFESTS / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("kustomize")
    return {overlay: render(overlay, tmp) for overlay in OVERLAYS}


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def test_overlays_present():
    assert {"gke", "eks", "on-prem"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(rendered, overlay):
    objs = rendered[overlay]
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Job",
            "ConfigMap"} <= kinds
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "editinfinity", obj["metadata"]["name"]


def test_secret_templates_validate_and_hold_placeholders_only(rendered):
    templates = sorted(MANIFESTS.rglob("*.template.yaml"))
    assert templates
    secrets = [(str(p.relative_to(ROOT)), d) for p in templates for d in yaml.safe_load_all(p.read_text()) if d]
    secrets += [(f"rendered {o}", s) for o, objs in rendered.items() for s in by_kind(objs, "Secret")]
    for where, secret in secrets:
        assert secret["kind"] == "Secret", where
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
        assert "data" not in secret, f"{where}: use stringData placeholders, never base64 data"
        for key, value in secret.get("stringData", {}).items():
            assert PLACEHOLDER.match(str(value)), f"{where}: {key} holds something other than a placeholder"
    # Templates are documentation, not resources: applying an overlay never overwrites a real Secret.
    for overlay, objs in rendered.items():
        assert not by_kind(objs, "Secret"), overlay


def test_no_credentials_anywhere_in_manifests():
    suspicious = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"|hf_[A-Za-z0-9]{30,})")
    for path in MANIFESTS.rglob("*"):
        if path.is_file():
            assert not suspicious.search(path.read_text()), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_the_schema_misses(rendered, overlay):
    objs = rendered[overlay]
    (job,) = by_kind(objs, "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("ghcr.io/editinfinity/editinfinity:")
    assert pod["securityContext"]["runAsNonRoot"] is True
    for tol in pod.get("tolerations", []):
        assert tol.get("operator", "Equal") in ("Equal", "Exists")
    quantity = re.compile(r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
    for section in container["resources"].values():
        for value in section.values():
            assert quantity.match(str(value)), value
    (pvc,) = by_kind(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"].get("storageClassName"), "each overlay picks an RWX storage class"
    (sa,) = by_kind(objs, "ServiceAccount")
    annotations = sa["metadata"].get("annotations", {})
    if overlay == "gke":
        assert "iam.gke.io/gcp-service-account" in annotations
    if overlay == "eks":
        assert "eks.amazonaws.com/role-arn" in annotations
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "editinfinity"}]


@pytest.mark.parametrize("overlay, scheme", [("gke", "gs"), ("eks", "s3"), ("on-prem", "s3")])
def test_launcher_config(rendered, overlay, scheme):
    (cm,) = [c for c in by_kind(rendered[overlay], "ConfigMap") if c["metadata"]["name"] == "kfp-launcher"]
    assert cm["data"]["defaultPipelineRoot"].startswith(f"{scheme}://")
    providers = yaml.safe_load(cm["data"]["providers"])
    default = providers[scheme]["default"]
    assert set(default["credentials"]) <= {"fromEnv", "secretRef"}
    if overlay == "on-prem":
        ref = default["credentials"]["secretRef"]
        assert ref["secretName"] == "editinfinity-storage" and default["forcePathStyle"] is True
        assert {ref["accessKeyKey"], ref["secretKeyKey"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_manifests_match_pipeline_profiles(rendered):
    profiles = load_profiles()
    objs = rendered["on-prem"]
    (pvc,) = by_kind(objs, "PersistentVolumeClaim")
    (job,) = by_kind(objs, "Job")
    pod = job["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"]
                 if next(v for v in pod["volumes"] if v["name"] == m["name"]).get("persistentVolumeClaim"))
    script = pod["containers"][0]["args"][0]
    for name in ("gke-a100", "gke-l4", "eks-p4d", "on-prem"):
        prof = profiles[name]
        assert prof.model_cache_pvc == pvc["metadata"]["name"]
        assert prof.model_cache_path == mount["mountPath"]
        assert f"OUT={prof.weights}\n" in script  # the pipelines' default weights are what the Job writes
    (template,) = yaml.safe_load_all((MANIFESTS / "overlays/on-prem/secrets/storage.template.yaml").read_text())
    onprem = profiles["on-prem"]
    assert onprem.storage_secret == template["metadata"]["name"]
    assert set(onprem.storage_secret_env.values()) == set(template["stringData"])
    (role,) = by_kind(objs, "Role")
    secret_rule = next(r for r in role["rules"] if r["resources"] == ["secrets"])
    assert secret_rule["resourceNames"] == [onprem.storage_secret]


def test_weights_job_downloads_the_official_files(rendered):
    (job,) = by_kind(rendered["gke"], "Job")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for needle in ("FoundationVision/Infinity", "infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "google/flan-t5-xl",
                   "editinfinity convert", "--transformer", "--vae", "--text-encoder", "--out"):
        assert needle in script
