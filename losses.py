"""Training objectives: image-text contrastive losses, self-distillation, masked prediction.

Everything a training step turns into a scalar lives here, next to the small modules that
produce what the losses compare (the DINO projection head and the masked-prediction decoders).

1. Contrastive losses (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023)
   Image i and caption i are a positive pair; every other caption in the batch is a negative.
   With L2-normalised embeddings x_i, y_j and a learned temperature t = exp(s):
     softmax / CLIP:  L = 1/2 [ CE_rows(t X Y^T) + CE_rows(t Y X^T) ],   target of row i = i
     sigmoid / SigLIP: L = -(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)),  z_ii = +1, else -1
   CLIP asks "which caption in this batch is mine?" (one softmax per row); SigLIP asks, for every
   pair on its own, "do these two belong together?" (no normalisation over the batch).

   Under DistributedDataParallel (DDP) every rank holds a shard of b pairs of the global batch of
   B = W * b (W ranks). The negatives should be the whole global batch, so features are gathered
   from all ranks, and the question is how to do that so the gradient is right. DDP AVERAGES
   parameter gradients over ranks, so the rule is:
       mean over ranks r of  d(loss_r)/d(theta)   must equal   d(global loss)/d(theta).
   The "local loss" scheme (open_clip, used for all its large models) satisfies it:
     - gather every rank's features WITH gradient (`gather_with_grad`: the backward pass sends the
       gradient of each gathered copy back to the rank that owns it and sums it there);
     - each rank scores only ITS OWN b rows against all B columns ([b, B] logits, not [B, B]),
       labels = arange(b) + rank * b, mean over its b rows.
     The global loss is then exactly the mean over ranks of the local losses, and with the
     summing backward, DDP's average yields exactly the gradient of the global loss. Memory and
     compute per rank are O(b * B) instead of O(B^2): this is the version that scales.
   Two tempting alternatives:
     (a) plain `torch.distributed.all_gather`: WRONG gradient. Its outputs are cut from the
         autograd graph, so the other ranks' features are constants. If both sides of the logits
         come from the gathered copies there is no gradient at all and the loss never falls. The
         usual patch (put the local tensor back into its slot) still loses every term where a
         feature acts as a NEGATIVE in another rank's rows: with the local loss the encoders'
         gradient points in a wrong direction; with the full [B, B] loss it has the right
         direction but is 1/W too small once DDP averages (only the temperature's is right).
     (b) gather WITH gradient, then the full [B, B] "global" loss on every rank: right gradient,
         wrong cost. Every rank computes the same loss, so the summing backward hands each rank
         W times d(global loss)/d(its features): this is the "gradient scaled by world size" of
         open_clip issue #616 (measured against the plain gather). Under DDP's averaging that W
         cancels and the result equals the local loss's gradient exactly (the local scheme also
         has sum over ranks of losses = W * global loss), but every rank builds and
         differentiates all B^2 logits: W times the compute and memory, which stops scaling.
         Only if gradients were SUMMED over ranks instead of averaged would both schemes need a
         1/W, and then (b) and the local loss would still agree with each other.
   tests/test_losses.py checks all of this numerically with 2 CPU processes.
   `patch_text_loss` is the same softmax (or sigmoid) applied to every PATCH on its own, each one
   against the batch's captions, so that the patch features the zero-shot segmentation reads line up
   with words (its docstring says why); it gathers the captions the same way.

2. Local-to-global self-distillation (SILC, Naeem et al. 2023, arXiv 2310.13355; machinery of
   DINO, Caron et al. 2021). An EMA teacher (ema.py) sees the two global crops, the student sees
   all crops; both pass through a `DINOHead` to K prototype logits. For teacher view q and student
   view v != q:   H(P_t, P_s) = -sum_k P_t[k] log P_s[k],
       P_t = softmax((t - c) / tau_t)   (centred and sharpened, no gradient)
       P_s = softmax(s / tau_s)
   averaged over all (q, v) pairs. Centring (c is a running mean of teacher outputs) stops one
   prototype from winning everything; sharpening (tau_t < tau_s) stops the uniform solution.
   SILC does not publish head size, K, temperatures or centre momentum: we use DINO's values.
   `koleo_loss` (DINOv2's KoLeo term, optional) pushes each image's head feature away from its
   nearest neighbour in the batch: if all images share one feature, the centred target is uniform.

3. Masked self-distillation and masked language modelling (MaskCLIP, Dong et al. 2022,
   arXiv 2208.12262; the patch loss as in iBOT, Zhou et al. 2022). The teacher encodes the full
   image; its patch tokens become soft codes P_t over K prototypes (an "online quantizer": head +
   centred, sharpened softmax with its own patch centre). The student encodes the masked image, a
   1-layer `MaskedPatchDecoder` predicts features at the masked positions, and the loss is the
   cross-entropy to the teacher codes averaged over masked patches only. For text, 20% of the
   caption tokens are masked BERT-style (masking.mlm_mask_tokens) and a small bidirectional
   `TextMLMDecoder` predicts them from the text encoder's token features (`mlm_loss`).

Schedules (learning rate, teacher temperature, EMA momentum) are one function, train.schedule.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from clip import Block, gather_rows, index_of_false, init_blocks_

# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------

def _world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a (no-grad) tensor over ranks in place; identity when not distributed."""
    if _world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the SUM of the gradients of its slice.

    Forward:  x [b, ...] on every rank -> cat over ranks [W*b, ...] (same on every rank).
    Backward: rank r's slice was used by all W ranks, so its gradient is the sum over ranks of
    the gradient each rank computed for that slice (a reduce-scatter).
    """

    @staticmethod
    def forward(ctx, x):
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.b = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):                          # grad: [W*b, ...]
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":              # reduce-scatter moves W times less data
            out = torch.empty_like(grad[: ctx.b])
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()                           # gloo has no reduce-scatter: all-reduce + slice
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x [b, ...] from all ranks along dim 0 -> [W*b, ...], keeping the gradient.

    Every rank must pass the same shape (use drop_last=True in the data loader). Identity when
    torch.distributed is not initialised or has a single rank.
    """
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits from autocast are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_pairs(img: torch.Tensor, txt: torch.Tensor) -> None:
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"expected image and text features of the same shape [b, E], got "
                         f"{tuple(img.shape)} and {tuple(txt.shape)}")


# --------------------------------------------------------------------------------------------
# 1. Contrastive losses
# --------------------------------------------------------------------------------------------

def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric softmax contrastive loss (CLIP) with the DDP local-loss scheme.

    img, txt: this rank's L2-normalised features [b, E]; pair i is (img[i], txt[i]).
    logit_scale: the multiplier t = exp(s) (a scalar tensor, as CLIP.forward returns it).
    Returns this rank's loss; its mean over ranks is the loss of the global batch, and DDP's
    gradient averaging then gives exactly the global-batch gradient (module docstring).
    Stable: F.cross_entropy works through logsumexp.

    Worked example: two orthogonal pairs, t = 1. The logits are the identity matrix; each row is
    a 2-way softmax with the right answer at 1 and the wrong one at 0, so every row costs
    -log(e / (e + 1)) = log(1 + e^-1) = 0.3133, and so does the mean.
    >>> e = torch.eye(2)
    >>> round(clip_loss(e, e, torch.tensor(1.0)).item(), 4)
    0.3133
    """
    _check_pairs(img, txt)
    rank, _ = _world()
    b = img.shape[0]
    all_img = gather_with_grad(img)                                    # [B, E]
    all_txt = gather_with_grad(txt)                                    # [B, E]
    # This rank's rows against every rank's columns; the positive of local row i sits in
    # global column rank * b + i.
    labels = torch.arange(b, device=img.device) + rank * b             # [b]
    # Under bf16 autocast the cosines come out of the matmul in bf16 (rounded once, |error| <=
    # 2^-8 |cos|); the scale and the softmax then work in float32 (_fp32).
    logits_i2t = logit_scale * _fp32(img @ all_txt.T)                  # [b, B]
    logits_t2i = logit_scale * _fp32(txt @ all_img.T)                  # [b, B]
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def sigmoid_pair_sum(logits: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """SigLIP's sum over a block of logits [r, B] of -log sigmoid(z * logit), z = +1 for each row's
    own caption (column own[row], own [r]) and -1 for every other: the one idiom behind siglip_loss
    and the sigmoid form of patch_text_loss."""
    z = -torch.ones_like(logits)
    z[torch.arange(logits.shape[0], device=logits.device), own] = 1.0
    return -F.logsigmoid(z * logits).sum()


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP) with negatives from every rank.

    img, txt: this rank's L2-normalised features [b, E]; logit_scale t = exp(t') and logit_bias b
    are scalar tensors (SigLIP init: t' = ln 10, b = -10). Each rank scores its b images against
    all B captions; summed over ranks this covers every one of the B x B pairs exactly once.
    Returns -(1/b) sum over this rank's [b, B] block of log sigmoid(z * logit); the mean over
    ranks is the SigLIP loss of the global batch, -(1/B) sum over all B x B pairs. Only the text
    is gathered: open_clip passes it around a ring of send/recv instead, which saves memory but
    computes the same sum. Stable: F.logsigmoid never forms exp(large).

    Worked example: two orthogonal pairs, t = 1, b = 0. The two positives have logit 1 and cost
    -log sigmoid(1) = 0.3133 each; the two negatives have logit 0 and cost -log sigmoid(0) =
    log 2 = 0.6931 each. Sum 2.0129, divided by B = 2: 1.0064.
    >>> e = torch.eye(2)
    >>> round(siglip_loss(e, e, torch.tensor(1.0), torch.tensor(0.0)).item(), 4)
    1.0064
    """
    _check_pairs(img, txt)
    if logit_bias is None:
        raise ValueError("siglip_loss needs a logit bias: build the model with init_logit_bias "
                         "(SigLIP: -10, with logit scale init ln 10)")
    rank, _ = _world()
    b = img.shape[0]
    all_txt = gather_with_grad(txt)                                    # [B, E]
    logits = logit_scale * _fp32(img @ all_txt.T) + logit_bias         # [b, B], float32 (see clip_loss)
    own = torch.arange(b, device=img.device) + rank * b               # [b]: local row i -> global column
    return sigmoid_pair_sum(logits, own) / b


def patch_text_loss(patches: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                    logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Every patch of image i must pick caption i among the batch's captions (a dense contrastive loss).

    patches: this rank's L2-normalised projected patch features [b, N, E] (what zero-shot segmentation
    compares with the class prompts); txt: this rank's L2-normalised captions [b, E].
      softmax (logit_bias None):  L = mean over the b*N patches p of image i of CE(t * p Y^T, target i)
      sigmoid (a bias given):     L = -(1/(b*N)) sum_p sum_j log sigmoid(z_ij (t p.y_j + bias))
    with Y every rank's captions (gathered with gradient, the local-loss scheme of clip_loss: the mean
    over ranks is the global loss, and DDP's average its gradient).

    Why: the contrastive loss only asks the POOLED embedding to match the caption, and a mean of patches
    can match it while each patch is noise that cancels in the average (measured on the shapes world:
    99% zero-shot classification with 25% of object patches naming their own object). Scoring each
    patch the way the dense evaluation will score it gives every patch the gradient. It is a
    multiple-instance loss: a background patch is also asked for its image's caption, a target it can
    only meet from context; the caption still names what is in the image, so the object patches learn
    their words. Patch-level image-text alignment in the spirit of PACL (Mukhoti et al. 2023,
    arXiv 2212.04994, which pools patches with text-conditioned weights instead); not a loss of
    SILC or MaskCLIP. Cost: b*N*B logits per rank, N times the contrastive loss's.

    Worked example: t = 1, captions e0 and e1, image 0's patches (e0, e1), image 1's (e1, e1). A patch
    equal to its caption has logits (1, 0): cost log(1 + e^-1) = 0.3133; image 0's second patch points
    at the wrong caption, logits (0, 1): cost log(1 + e) = 1.3133. Mean of the four: 0.5633.
    >>> e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> p = torch.stack([torch.stack([e0, e1]), torch.stack([e1, e1])])
    >>> round(patch_text_loss(p, torch.eye(2), torch.tensor(1.0)).item(), 4)
    0.5633
    """
    if patches.ndim != 3 or patches.shape[0] != txt.shape[0] or patches.shape[2] != txt.shape[1]:
        raise ValueError(f"expected patches [b, N, E] and captions [b, E], got {tuple(patches.shape)} "
                         f"and {tuple(txt.shape)}")
    rank, _ = _world()
    b, n, _ = patches.shape
    all_txt = gather_with_grad(txt)                                    # [B, E]
    logits = logit_scale * _fp32(patches.flatten(0, 1) @ all_txt.T)    # [b*N, B]
    own = (torch.arange(b, device=txt.device) + rank * b).repeat_interleave(n)   # [b*N]: patch -> its caption
    if logit_bias is None:
        return F.cross_entropy(logits, own)
    return sigmoid_pair_sum(logits + logit_bias, own) / (b * n)


# --------------------------------------------------------------------------------------------
# 2. Projection head and local-to-global self-distillation (SILC / DINO)
# --------------------------------------------------------------------------------------------

class DINOHead(nn.Module):
    """MLP -> L2 normalise -> weight-normalised bias-free linear layer to K prototypes.

    x [..., in_dim] -> logits [..., K]. The logits are cosine similarities between the normalised
    bottleneck feature and K unit-norm prototype vectors (rows of `last_layer.weight`, normalised
    at every forward pass: DINO's weight norm with the gain frozen at 1, written out directly
    instead of the deprecated nn.utils.weight_norm). So every logit lies in [-1, 1] and the
    temperatures alone set how peaked the distributions are.
    DINO sizes: hidden 2048, bottleneck 256, K 65536, 3 layers; SILC does not publish its head.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 out_dim: int = 65536, nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            layers = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):          # DINO's init
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Prototypes [K, bottleneck]; only their directions matter (rows are normalised).
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The unit bottleneck feature [..., bottleneck]: what the prototypes are compared with."""
        return F.normalize(self.mlp(x), dim=-1)

    def prototype_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Unit bottleneck features [..., bottleneck] -> cosines with the K prototypes [..., K]."""
        w = F.normalize(self.last_layer.weight, dim=-1)                # [K, bottleneck], unit rows
        return F.linear(z, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototype_logits(self.embed(x))                    # [..., K]

    def cancel_last_layer_grad(self) -> None:
        """Drop the prototypes' gradient (call after backward, before optimizer.step).

        DINO freezes the last layer for the first epoch: early on the prototypes would chase a
        random backbone and training is less stable. AdamW skips a parameter whose grad is None,
        so its moments are not touched either. Whether and for how long to do this is the
        training loop's choice (DINO: 1 epoch; a short run may use a few percent of its steps).
        """
        self.last_layer.weight.grad = None


def _soft_cross_entropy(student: torch.Tensor, teacher_probs: torch.Tensor,
                        student_temp: float) -> torch.Tensor:
    """-sum_k P_t[k] log softmax(s / tau_s)[k] per row: [..., K] -> [...] (log_softmax is stable)."""
    return -(teacher_probs * F.log_softmax(_fp32(student) / student_temp, dim=-1)).sum(-1)


class LocalToGlobalLoss(nn.Module):
    """SILC's local-to-global self-distillation loss (DINO's loss) with a running centre.

    forward(student_logits, teacher_logits, teacher_temp):
      student_logits: list of [b, K], global views first, then local views (with gradient);
      teacher_logits: list of [b, K], the global views (the i-th teacher view is the same crop as
      the i-th student view, and that pair is skipped: a view is not distilled into itself).
    Returns the mean over pairs (q, v), v != q, of the batch-mean of H(P_t(q), P_s(v)); with
    2 global + 8 local views that is 2 * 10 - 2 = 18 pairs. Each term is a mean over this rank's
    b samples, so the mean over ranks (what DDP averages) is the global-batch loss.
    The centre is NOT updated here: once per optimizer step, the training loop calls
    `update_center(center_stats(...))` with the teacher logits of the whole step,
        c <- m c + (1 - m) * mean over the GLOBAL batch and all teacher views of t,
    with the sum all-reduced over ranks, so every rank keeps the same centre. Every micro-batch of
    a step (gradient accumulation) then sees the same centre, and the step makes one update from
    all of its samples: exactly what one process on the whole batch does.
    Defaults are DINO's (SILC does not publish them): tau_s = 0.1, m = 0.9.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))        # [1, K], in checkpoints

    def forward(self, student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        if len(teacher_logits) < 1 or len(student_logits) < 1:
            raise ValueError("need at least one teacher view and one student view")
        if len(teacher_logits) == 1 and len(student_logits) == 1:
            raise ValueError("one teacher view and one student view of the same crop leave no "
                             "pair to distil (pairs with the same index are skipped)")
        total, n_pairs = 0.0, 0
        for q, t in enumerate(teacher_logits):
            # Teacher targets: centred, sharpened, no gradient (stop-gradient on the teacher).
            p_t = F.softmax((_fp32(t.detach()) - self.center) / teacher_temp, dim=-1)   # [b, K]
            for v, s in enumerate(student_logits):
                if v == q:
                    continue
                total = total + _soft_cross_entropy(s, p_t, self.student_temp).mean()
                n_pairs += 1
        return total / n_pairs

    def update_center(self, stats: torch.Tensor) -> None:
        """c <- m c + (1 - m) * (global-batch mean of the teacher logits over all views);
        stats: `center_stats` of this rank's teacher logits of the step."""
        update_center_(self.center, stats, self.center_momentum)


def koleo_loss(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo spread term (Sablayrolles et al. 2019, "Spreading vectors for similarity search";
    DINOv2, Oquab et al. 2023, uses it with weight 0.1):
        L = -(1/B) sum_i log(d_i),   d_i = min over j != i of ||z_i - z_j||,
    for unit vectors z [b, d] of this rank, the minimum taken over the GLOBAL batch. It is the
    Kozachenko-Leonenko entropy estimate of the batch's distribution on the sphere, up to constants:
    it grows without bound as two images land on the same point, so it keeps images apart.

    Why SILC can use it here: the centred teacher P_t = softmax((t - c) / tau_t) is uniform exactly
    when every image's bottleneck feature is the same point (then t - c is the same for every k), and
    at CPU scale the pooled teacher sits there for most of a run (docs/experiments.md). DINOv2 puts the
    term on the backbone's class token; we put it on the head's unit bottleneck, the vector whose spread
    the teacher's codes need. The nearest neighbour is chosen without gradient (it is an argmin); the
    distance to it carries the gradient, with eps under the root so identical rows give a finite one.
    Under DDP each rank scores its own rows against the gathered batch (gather_with_grad, as the local
    contrastive loss does), so the mean over ranks is the global-batch loss and torchrun trains as one
    process does (DINOv2 takes the neighbours within each GPU's batch instead)."""
    if z.dim() != 2 or z.shape[0] < 1:
        raise ValueError(f"expected unit features [b, d] with b >= 1, got {tuple(z.shape)}")
    rank, _ = _world()
    z = _fp32(z)
    all_z = gather_with_grad(z)                                         # [B, d]
    if all_z.shape[0] < 2:
        raise ValueError("KoLeo needs at least two rows in the global batch")
    b = z.shape[0]
    with torch.no_grad():
        sim = z @ all_z.T                                               # [b, B]
        own = torch.arange(b, device=z.device) + rank * b
        sim[torch.arange(b, device=z.device), own] = -float("inf")     # a row is not its own neighbour
        nearest = sim.argmax(dim=1)                                     # [b]: max cosine = min distance
    d = torch.sqrt(((z - all_z[nearest]) ** 2).sum(-1) + eps)          # [b]
    return -torch.log(d).mean()


@torch.no_grad()
def center_stats(teacher_logits) -> torch.Tensor:
    """What a centre update needs from a batch of teacher logits [..., K] (or a list of them):
    their sum over every row and the number of rows, as one vector [K + 1] (float32, or float64
    for float64 logits). Stats of several micro-batches simply add up."""
    if isinstance(teacher_logits, (list, tuple)):
        teacher_logits = torch.cat([x.flatten(0, -2) for x in teacher_logits])
    t = _fp32(teacher_logits.detach()).flatten(0, -2)                   # [rows, K], at least float32
    return torch.cat([t.sum(0), t.new_tensor([t.shape[0]])])            # [K + 1]


@torch.no_grad()
def update_center_(center: torch.Tensor, stats: torch.Tensor, momentum: float) -> None:
    """The one centre update (DINO; iBOT's patch centre is the same rule):
        c <- m c + (1 - m) * sum / count,
    with the sum and count of `center_stats` all-reduced over ranks in ONE call, so every rank
    keeps the same centre and unequal shards would still give the true mean. The centre keeps its
    own dtype (float32 in training) whatever the logits' dtype (bf16 under autocast)."""
    stats = _all_reduce_sum(stats.to(center.device, center.dtype).clone())
    batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)                # [1, K]
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


@torch.no_grad()
def teacher_entropy(teacher_logits, center, temp) -> tuple[torch.Tensor, torch.Tensor]:
    """How informative the centred, sharpened teacher P_t = softmax((t - c) / tau_t) is; teacher_logits
    a list of [b, K]. -> (mean over rows of H(P_t), H(mean over the GLOBAL batch of P_t)), in nats.
    DINO has two ways to fail, and the pair tells them apart (log K: uniform, 0: one prototype):
      uniform:        both near log K: every image gets the same flat target, nothing to learn;
      one prototype:  both near 0: every image gets the same sharp target;
      healthy:        the first low (each image's target is sharp), the second high (images differ).
    Between the last two, exp(second) is about how many prototypes the batch's targets use.
    The batch's mean P_t is all-reduced over ranks, so the second number is the global batch's (the
    first is this rank's mean; the log averages it over ranks). Returned as tensors (no host sync)."""
    def entropy(q):                                                             # [..., K] -> [...]
        return -(q * torch.log(q.clamp_min(1e-12))).sum(-1)
    t = torch.cat(teacher_logits).float()
    p = F.softmax((t - center) / temp, dim=-1)                                  # [rows, K]
    stats = _all_reduce_sum(center_stats(p))                                    # [K + 1]: global sum and count
    return entropy(p).mean(), entropy(stats[:-1] / stats[-1])


# --------------------------------------------------------------------------------------------
# 3. Masked self-distillation (MaskCLIP / iBOT) and masked language modelling
# --------------------------------------------------------------------------------------------

def _global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Turn a local sum over items into this rank's share of the GLOBAL mean over items.

    total: sum of per-item losses on this rank (with gradient); count: number of items here.
    Returns total * W / global_count, so that mean over ranks (what DDP's gradient averaging
    computes) = global_sum / global_count: the same loss as one process on the whole batch, even
    when ranks hold different numbers of masked items. Returns 0 (with a graph) if no rank has
    any item.
    """
    _, world = _world()
    global_count = _all_reduce_sum(count.detach().to(total.dtype).clone())
    return total * world / global_count.clamp(min=1)


class MaskedDistillLoss(nn.Module):
    """Masked patch self-distillation (MaskCLIP's distillation loss, computed as in iBOT).

    forward(student_logits [B, N, K], teacher_logits [B, N, K], mask [B, N] bool, teacher_temp):
      student logits come from the masked student (decoder + head), teacher logits from the
      teacher on the full image (head). Targets: P_t = softmax((t - c) / tau_t) with this loss's
      OWN patch centre c (patch statistics differ from the pooled image ones).
    loss = sum over masked patches of H(P_t, P_s) / number of masked patches, where the count is
    over the global batch (all ranks): see `_global_mean`. Visible patches are not selected at
    all, so they get exactly zero weight and zero gradient. count (optional): this rank's number
    of masked patches over the whole optimizer step, when the step is split into micro-batches
    (gradient accumulation); default: the masked patches of this call.
    num_masked (optional Python int): the masked count per image, when every image hides the same
    number (train.py's masks do). The masked patches are then gathered with an index of static
    size, which torch.compile traces in one graph; without it, boolean indexing (any mask, eager
    friendly). Both select the same rows in the same order, so they give the same loss bit for bit.
    The centre is updated once per optimizer step by the training loop, `update_center(
    center_stats(teacher patch logits))`, from ALL patches of the global batch (iBOT does the same;
    MaskCLIP does not say), momentum 0.9.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))        # [1, K]

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor, teacher_temp: float, num_masked: int | None = None,
                count: torch.Tensor | None = None) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape or student_logits.ndim != 3:
            raise ValueError(f"expected student and teacher logits of the same shape [B, N, K], "
                             f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        if mask.shape != student_logits.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"expected a bool mask [B, N] = {tuple(student_logits.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if num_masked is not None and not torch.compiler.is_compiling():
            if not bool((mask.sum(dim=1) == num_masked).all()):
                raise ValueError(f"num_masked={num_masked} but the mask's rows hide "
                                 f"{mask.sum(dim=1).tolist()} patches")
        t = _fp32(teacher_logits.detach())
        if num_masked is None:
            t_m, s_m = t[mask], student_logits[mask]                                 # [M, K]
        else:   # the same rows as t[mask], in the same (row-major) order, with a static M = B * n
            idx = index_of_false(~mask, num_masked)                                  # [B, n]
            t_m = gather_rows(t, idx).flatten(0, 1)                                  # [M, K]
            s_m = gather_rows(student_logits, idx).flatten(0, 1)                     # [M, K]
        p_t = F.softmax((t_m - self.center) / teacher_temp, dim=-1)                  # [M, K]
        ce = _soft_cross_entropy(s_m, p_t, self.student_temp)                        # [M]
        return _global_mean(ce.sum(), mask.sum() if count is None else count)

    def update_center(self, stats: torch.Tensor) -> None:
        """c <- m c + (1 - m) * (mean of the teacher logits over all patches of the global batch)."""
        update_center_(self.center, stats, self.center_momentum)


class MaskedPatchDecoder(nn.Module):
    """MaskCLIP's small visual decoder: fills the hidden positions, then `num_layers` Blocks.

    forward(tokens [B, 1+N', D], mask [B, N] bool, pos) -> predictions [B, N, D] (no class token)
      tokens: the student encoder's output on the masked image (VisionTransformer.forward()[1]);
      pos: the VisionTransformer itself (a square grid is assumed) or a position embedding
        [1 + N, D] for this grid (class token first), e.g. visual.pos_embed_for(gh, gw).
    The decoder adds its learnable `mask_token` at every hidden position, in both mask modes:
      drop mode (N' = N - n): the hidden slots are empty, so they become mask_token + their
        position embedding (nothing else would tell the decoder where a slot is), and the visible
        encoder tokens go back to their original positions;
      token mode (N' = N): the encoder already produced an output at every position (its first
        guess, with the position inside); mask_token is added there to mark it as hidden. Starting
        at zero (as iBOT's), it is the identity at first. Using it in both modes also keeps every
        parameter in use, which DDP needs.
    Then the Blocks (bidirectional, with the class token as global context) and a LayerNorm, so
    the predictions have the scale of the encoder's ln_post tokens that the teacher's head reads.
    The position embedding is the encoder's own (shared, gradient included): the paper does not
    say how its decoder encodes positions; sharing adds no parameters and works at any grid.
    MaskCLIP: 1 layer; width = encoder width here (the paper does not give it).
    """

    def __init__(self, dim: int, num_heads: int, num_layers: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))                   # [D]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(num_layers))
        if num_layers > 0:                  # (0 layers: placement + LayerNorm only, used in tests)
            init_blocks_(self.blocks, dim)
        self.ln = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pos) -> torch.Tensor:
        B, N = mask.shape
        D = tokens.shape[-1]
        if mask.dtype != torch.bool or tokens.shape[0] != B:
            raise ValueError(f"expected a bool mask [B, N] with B = {tokens.shape[0]}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        if isinstance(pos, torch.Tensor):
            pos_embed = pos                                                # [1 + N, D]
        else:
            G = math.isqrt(N)
            if G * G != N:
                raise ValueError(f"{N} patches is not a square grid: pass the position embedding "
                                 f"for this grid (visual.pos_embed_for(gh, gw)) instead of the model")
            pos_embed = pos.pos_embed_for(G, G)                            # [1 + N, D]
        if pos_embed.shape != (1 + N, D):
            raise ValueError(f"position embedding must be [1 + N, D] = [{1 + N}, {D}], "
                             f"got {tuple(pos_embed.shape)}")
        cls, patches = tokens[:, :1], tokens[:, 1:]                        # [B, 1, D], [B, N', D]
        mask_tok = self.mask_token.to(tokens.dtype)
        n_visible = patches.shape[1]        # a static size: the mode needs no look at mask values
        if n_visible != N and not torch.compiler.is_compiling():
            counts = mask.sum(dim=1)                                       # [B] (eager check only)
            if not bool((counts == N - n_visible).all()):
                raise ValueError(f"tokens hold {n_visible} patch tokens; expected N = {N} (token "
                                 f"mode) or N - masked = {N - int(counts[0])} per image (drop mode)")
        if n_visible == N:                                                 # token mode
            x = patches + mask.unsqueeze(-1).to(tokens.dtype) * mask_tok   # [B, N, D]
        else:                                                              # drop mode
            x = (mask_tok + pos_embed[1:].to(tokens.dtype)).expand(B, N, D)           # [B, N, D]
            # Put the visible tokens back where the encoder took them from (index_of_false gives
            # the same positions, in the same order, as the encoder's gather).
            idx = index_of_false(mask, n_visible).unsqueeze(-1).expand(-1, -1, D)    # [B, N', D]
            x = x.scatter(1, idx, patches)                                 # [B, N, D]
        x = torch.cat([cls, x], dim=1)                                     # [B, 1 + N, D]
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x[:, 1:])                                           # [B, N, D]


class TextMLMDecoder(nn.Module):
    """MaskCLIP's text decoder for masked language modelling: bidirectional Blocks -> vocab logits.

    forward(features [B, L, W], tokens=None) -> logits [B, L, V]
      features: the CAUSAL text encoder's token features on the masked caption
        (TextTransformer.forward()[1]);
      tokens (optional): that caption's ids, to keep padding out of the attention.
    How a causal encoder serves a bidirectional task: the encoder's feature at position j has
    read tokens 0..j only. The decoder has no causal mask, so its output at a masked position i
    attends to the features at every position, and those at j > i carry the words AFTER i. Left
    context reaches i through the encoder, right context through the decoder. The encoder keeps
    its causal mask (the contrastive loss pools at EOT under it), and the MLM branch is a
    separate encoder forward on the corrupted caption.
    MaskCLIP: 4 layers (the paper's text decoder); width = the text encoder's.
    """

    def __init__(self, width: int, num_heads: int, vocab_size: int, pad_id: int, num_layers: int = 4,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.pad_id = pad_id
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio) for _ in range(num_layers))
        if num_layers > 0:
            init_blocks_(self.blocks, width)
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = None
        if tokens is not None:
            # bool [B, 1, 1, L]: True = may be attended to. Every caption has SOT, so no row is empty.
            attn_mask = (tokens != self.pad_id)[:, None, None, :]
        x = features                                                       # [B, L, W]
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)                                # no causal mask
        return self.out(self.ln(x))                                        # [B, L, V]


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the selected (label != -100) positions only: logits [B, L, V], labels [B, L].

    Averaged over the selected positions of the GLOBAL batch (`_global_mean`), so 2 DDP ranks give
    the same loss and gradient as one process even though their captions hold different numbers
    of masked tokens. 0 if nothing is selected anywhere. count (optional): this rank's number of
    selected positions over the whole optimizer step when it is split into micro-batches
    (gradient accumulation), so the step's loss is one mean over all of them.
    """
    if logits.shape[:2] != labels.shape or logits.ndim != 3:
        raise ValueError(f"expected logits [B, L, V] and labels [B, L], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    ce = F.cross_entropy(_fp32(logits.flatten(0, 1)), labels.flatten(), ignore_index=-100,
                         reduction="sum")
    return _global_mean(ce, (labels != -100).sum() if count is None else count)
