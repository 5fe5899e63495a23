"""The one shape registry of the benchmark suite: CLIP towers × batch × experts × routing × mode.

Token counts and widths are those of the CLIP towers (open_clip): ViT-B/32 has 50 tokens per image (49 patches +
CLS), ViT-B/16 197, ViT-L/14 257; text towers use 77 tokens. F = 4·D in every CLIP MLP.
Routing patterns (top-k experts per token are always distinct):
  uniform     each token picks k experts uniformly at random;
  skewed      experts drawn with Zipf probabilities p_e ∝ 1/(e+1)^1.5: a few hot experts, a long cold tail;
  all_to_one  every token sends slot j to expert j: the whole load on k experts, the other E−k empty.
"""
from dataclasses import dataclass

TOWERS = {
    # name: (tokens per item, D, F)
    "vit_b32": (50, 768, 3072),
    "vit_b16": (197, 768, 3072),
    "vit_l14": (257, 1024, 4096),
    "text_b": (77, 512, 2048),   # text tower of ViT-B CLIP models
    "text_l": (77, 768, 3072),   # text tower of ViT-L/14
}
# Dry runs (bench/gpu_check.py --dry-run, CPU, Triton interpreter): every tower shrunk to 3 tokens per item,
# D 32, F 64, and batches capped at 8, so that a whole check runs in seconds; such cases carry tiny=True.
TINY_TOWER = (3, 32, 64)
TINY_MAX_BATCH = 8
ROUTINGS = ("uniform", "skewed", "all_to_one")
MODES = ("forward", "forward_backward")
TOP_K = 2


@dataclass(frozen=True)
class Case:
    tower: str
    batch: int
    num_experts: int
    routing: str
    mode: str
    top_k: int = TOP_K
    tiny: bool = False  # the dry-run size of this case (TINY_TOWER), same tower name and routing

    @property
    def tokens(self) -> int:
        if self.tiny:
            return TINY_TOWER[0] * min(self.batch, TINY_MAX_BATCH)
        return TOWERS[self.tower][0] * self.batch

    @property
    def d_model(self) -> int:
        return (TINY_TOWER if self.tiny else TOWERS[self.tower])[1]

    @property
    def hidden(self) -> int:
        return (TINY_TOWER if self.tiny else TOWERS[self.tower])[2]

    @property
    def group(self) -> str:
        """Providers of one group run the same shape and are compared side by side."""
        return f"{self.tower} b{self.batch} T{self.tokens} E{self.num_experts} {self.routing} {self.mode}"

    @property
    def id(self) -> str:
        return f"{self.tower}-b{self.batch}-E{self.num_experts}-{self.routing}-{self.mode}"

    def flops(self) -> int:
        """Expert FLOPs: forward 4·T·k·D·F (two GEMMs of 2·T·k·D·F); forward+backward three times that."""
        forward = 4 * self.tokens * self.top_k * self.d_model * self.hidden
        return forward if self.mode == "forward" else 3 * forward


def _grid(towers_batches, experts_routings):
    return [Case(tower, batch, e, routing, mode)
            for tower, batch in towers_batches for e, routing in experts_routings for mode in MODES]


# CPU (fp32): finishes in a few minutes on 2 cores. E=4 with every routing; E=8 uniform.
CPU_CASES = _grid(
    [("vit_b32", 1), ("vit_b32", 8), ("text_b", 8), ("vit_l14", 1)],
    [(4, "uniform"), (4, "skewed"), (4, "all_to_one"), (8, "uniform")],
)

# GPU (bf16): inference latency (batch 1) to training batches.
GPU_CASES = _grid(
    [("vit_b32", 1), ("vit_b32", 256), ("vit_b16", 256), ("vit_l14", 1), ("vit_l14", 256), ("text_l", 256)],
    [(4, "uniform"), (4, "skewed"), (4, "all_to_one"), (8, "uniform")],
) + _grid([("vit_l14", 1024)], [(4, "uniform")])

# End-to-end: a whole open_clip ViT-B/32, dense vs upcycled (E=4, top-2).
E2E_MODEL = "ViT-B-32"
E2E_EXPERTS = 4
E2E_BATCH = {"cpu": 4, "cuda": 256}
