from specjax.models.llama import Llama as Llama
from specjax.models.llama import LlamaConfig as LlamaConfig
from specjax.models.model import Model as Model
from specjax.models.model import forward_logits as forward_logits
