"""The README's Python blocks run as written, and its claim about a planted bug holds."""

import pathlib
import re

import jbp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run(capsys):
    blocks = _blocks()
    assert len(blocks) >= 2
    scope: dict = {}
    user_layer: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)
        if "class Scale" in block:
            user_layer = dict(scope)  # later blocks reuse the names params, x, y
    out = capsys.readouterr().out
    assert out.count("gradient check: OK") == 2

    # The README says: drop `* params["s"]` in delta_in and layer 0 is the first mismatch.
    scope = user_layer
    scale_cls = scope["Scale"]

    class Broken(scale_cls):
        def backward(self, params, cache, delta_out):
            grads, _ = super().backward(params, cache, delta_out)
            return grads, delta_out

    net = jbp.Sequential([jbp.Dense(4, 3, "tanh"), Broken(3), jbp.Dense(3, 1)])
    params = scope["params"]
    params = (params[0], {"s": params[1]["s"] * 2.0}, params[2])
    report = jbp.verify(net, "mse", params, scope["x"], scope["y"])
    assert not report.ok
    assert report.first_mismatch.layer == 0
