"""Old import paths from before the package's rooms still work, warn, and give the new modules."""

import importlib
import subprocess
import sys

import pytest

import tunelab


@pytest.mark.parametrize("old", sorted(tunelab.MOVED))
def test_an_old_module_path_imports_the_new_module_and_warns(old):
    new = importlib.import_module(f"tunelab.{tunelab.MOVED[old]}")
    code = (f"import warnings, tunelab.{tunelab.MOVED[old]} as new\n"
            f"with warnings.catch_warnings(record=True) as w:\n"
            f"    warnings.simplefilter('always')\n"
            f"    import tunelab.{old} as old\n"
            f"assert old is new, (old, new)\n"
            f"assert any('moved to tunelab.{tunelab.MOVED[old]}' in str(x.message) for x in w), [str(x.message) for x in w]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert new.__name__ == f"tunelab.{tunelab.MOVED[old]}"


def test_the_former_models_and_data_modules_still_give_their_names():
    from tunelab.data import Collator, batches  # the former tunelab.data module
    from tunelab.data.encoding import Collator as C2
    from tunelab.models import EMBEDDED, load  # the former tunelab.models module
    from tunelab.models.loading import load as load2

    assert Collator is C2 and callable(batches) and load is load2 and "smollm2-135m" in EMBEDDED
    with pytest.raises(ImportError, match="nothing_here"):
        from tunelab.models import nothing_here  # noqa: F401


def test_every_moved_target_exists():
    for old, new in tunelab.MOVED.items():
        assert importlib.util.find_spec(f"tunelab.{new}") is not None, old
