"""Public hypothesis strategies for property-testing backprop (needs ``hypothesis``).

Import it on its own, ``import jbp.testing``; ``import jbp`` does not import
hypothesis. Use the strategies to check your own layers' backward rules:

    from hypothesis import given
    import jbp, jbp.testing

    @given(jbp.testing.problems(nets=my_nets(), dtypes=("float64",)))
    def test_my_layer(problem):
        net, loss, params, x, y = problem
        jbp.verify(net, loss, params, x, y).raise_if_failed()
"""

from jbp._architectures import Architecture as Architecture

from ._strategies import PaddedProblem as PaddedProblem
from ._strategies import activations as activations
from ._strategies import architectures as architectures
from ._strategies import batch_sizes as batch_sizes
from ._strategies import cnns as cnns
from ._strategies import dtypes as dtypes
from ._strategies import llamas as llamas
from ._strategies import losses as losses
from ._strategies import padded_problems as padded_problems
from ._strategies import problems as problems
from ._strategies import recurrents as recurrents
from ._strategies import resnets as resnets
from ._strategies import sequence_stacks as sequence_stacks
from ._strategies import transformers as transformers
from ._strategies import vjp_inputs as vjp_inputs

__all__ = [
    "Architecture",
    "PaddedProblem",
    "activations",
    "architectures",
    "batch_sizes",
    "cnns",
    "dtypes",
    "llamas",
    "losses",
    "padded_problems",
    "problems",
    "recurrents",
    "resnets",
    "sequence_stacks",
    "transformers",
    "vjp_inputs",
]
