"""The Kubeflow layer's tests (components, pipelines, the ``editinfinity pipeline`` CLI, manifests).

They need kfp (``pip install -e '.[test]'`` installs it, so ``make test`` runs them); without it the whole folder
is skipped and the rest of the suite runs as usual.
"""

import pytest

pytest.importorskip("kfp", reason="kfp is not installed: pip install -e '.[pipeline]' to run the Kubeflow tests")
