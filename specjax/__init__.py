"""specjax: lossless speculative decoding in JAX."""
from specjax import drafters as drafters
from specjax.cost_model import CostModel as CostModel
from specjax.cost_model import cost_model as cost_model
from specjax.decode import GenerateOutput as GenerateOutput
from specjax.decode import generate as generate
from specjax.drafters import make_drafter as make_drafter
from specjax.io import load_model as load_model
from specjax.models import Model as Model
from specjax.models import forward_logits as forward_logits
from specjax.sampling import Sampling as Sampling
from specjax.sampling import warp as warp

__version__ = "0.1.0"
