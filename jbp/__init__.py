"""jbp: hand-written backpropagation from the δ equations, checked against jax.grad."""

from ._activations import ActivationFn as ActivationFn
from ._activations import activation_names as activation_names
from ._activations import register_activation as register_activation
from ._backprop import backprop as backprop
from ._backprop import objective as objective
from ._backprop import value_and_backprop as value_and_backprop
from ._layers import Activation as Activation
from ._layers import Dense as Dense
from ._layers import Layer as Layer
from ._layers import Sequential as Sequential
from ._layers import mlp as mlp
from ._losses import Loss as Loss
from ._losses import loss_names as loss_names

__version__ = "0.1.0"
from ._bench import BenchRow as BenchRow
from ._bench import benchmark as benchmark
from ._bench import format_benchmark as format_benchmark
from ._per_example import NoiseScale as NoiseScale
from ._per_example import clipped_grad as clipped_grad
from ._per_example import dp_grad as dp_grad
from ._per_example import grad_variance as grad_variance
from ._per_example import gradient_noise_scale as gradient_noise_scale
from ._per_example import per_example_grads as per_example_grads
from ._per_example import per_example_norms as per_example_norms
from ._per_example import sum_grad_squared as sum_grad_squared
from ._verify import FiniteDifferenceCheck as FiniteDifferenceCheck
from ._verify import GradientMismatch as GradientMismatch
from ._verify import LeafRow as LeafRow
from ._verify import Report as Report
from ._verify import TaylorCheck as TaylorCheck
from ._verify import compare as compare
from ._verify import verify as verify
from ._zoo import random_problem as random_problem
