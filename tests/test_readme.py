"""The README's Python blocks run as written, and its claim about a planted bug holds."""

import pathlib
import re

import jax

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
        if "Scale(3), jbp.Dense(3, 1)" in block:
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
    assert report.blame == "layers[1]"  # the planted layer, not the first that differs


def test_readme_attention_bug_is_found_in_k_and_the_fix_passes():
    (block,) = [b for b in _blocks() if "def attention_bwd" in b]
    scope: dict = {"jax": jax, "jnp": jax.numpy, "jbp": jbp}
    exec(compile(block.replace("print(report)", ""), str(README), "exec"), scope)
    report = scope["report"]
    failing = {r.path for r in report.rows if not r.ok}
    assert failing == {"primals[1] (k)"} and not report.taylor.ok
    planted = "(ds.T @ q, p.T @ d_out)"
    assert planted in block
    exec(
        compile(block.replace(planted, "(ds.T @ q * scale, p.T @ d_out)"), str(README), "exec"),
        scope,
    )
    assert scope["report"].ok, scope["report"]
