"""Variance-prioritised replay buffer for VELR's online LRM alignment.

Follows the VELR paper (§4.3, Algorithm 1, App. C.2, C.6): during ReFL the latent
reward model (LRM) drifts away from the true pixel reward, so every few steps the latents the LRM
scored are decoded (no gradient), scored by the pixel reward model, and stored here together with
the ensemble variance the LRM had on them. The LRM is then re-fitted on samples drawn from the
buffer. An entry is (z0, text context, text length, true reward, ensemble variance):

  - capacity fixed (paper: 256); while not full every entry is kept;
  - once full, a new entry replaces the entry of LOWEST variance, and only if its own variance is
    higher (the buffer keeps the samples the ensemble is least sure about);
  - sampling draws entries with probability proportional to their variance (uniformly while all
    variances are zero);
  - a row with a non-finite value in any field (a NaN reward, an inf variance, a NaN latent) is
    never stored: `insert` and `load_state_dict` drop such rows and return how many they dropped.

All tensors live on the CPU (a 480x832x81 latent is 8.4 MB in fp32; 256 of them plus their UMT5
contexts are a few GB of host memory, never GPU memory). `state_dict()` / `load_state_dict()` save
and restore the buffer with a training checkpoint.

Several ranks (train_refl.py): the buffer is SHARED. Every rank all-gathers the new entries of all
ranks (in rank order) and inserts the same entries in the same order, so all ranks hold identical
buffers; sampling with a generator seeded identically on every rank then gives identical batches,
and the LRM update is the same on every rank. We chose this over per-rank buffers because the LRM
must stay identical across ranks (it defines every rank's loss), and a shared buffer sees the whole
global batch; the cost is world_size times the (small) insert traffic.

Left out: staleness-based eviction and the alignment schedule itself (that is train_refl.py's).
"""

import torch

FIELDS = ("z", "context", "lengths", "reward", "variance")


class ReplayBuffer:
    def __init__(self, capacity: int = 256):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.data = None  # dict FIELDS -> tensor with a leading entry dimension, created on first insert

    def __len__(self) -> int:
        return 0 if self.data is None else self.data["variance"].shape[0]

    def insert(self, z, context, lengths, reward, variance) -> int:
        """Insert a batch: z (B, 16, T, H, W), context (B, L, C), lengths (B,), reward (B,), variance (B,).
        Rows with a non-finite value in any field are dropped; returns how many were dropped."""
        batch = dict(zip(FIELDS, (z, context, lengths, reward, variance)))
        batch = {k: v.detach().to("cpu") for k, v in batch.items()}
        sizes = {k: v.shape[0] for k, v in batch.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all fields need the same batch size, got {sizes}")
        keep = _finite_rows(batch)
        for i in keep.nonzero().flatten().tolist():
            self._insert_one({k: v[i : i + 1] for k, v in batch.items()})
        return int(keep.numel() - keep.sum())

    def _insert_one(self, entry: dict):
        if self.data is None:
            self.data = {k: v.clone() for k, v in entry.items()}
        elif len(self) < self.capacity:
            self.data = {k: torch.cat([self.data[k], entry[k]]) for k in FIELDS}
        else:
            j = int(self.data["variance"].argmin())
            if entry["variance"].item() > self.data["variance"][j].item():
                for k in FIELDS:
                    self.data[k][j] = entry[k][0]

    def sample(self, n: int, generator=None) -> dict:
        """n entries drawn with replacement, P(entry) proportional to its variance -> dict of tensors."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        weights = self.data["variance"].float()
        bad = (~torch.isfinite(weights)).nonzero().flatten().tolist()
        if bad:  # insert never stores these; the data was changed from outside
            raise ValueError(f"cannot sample: the replay buffer holds a non-finite variance at entries {bad[:8]} "
                             f"({weights[bad[:8]].tolist()}); sampling weights must be finite")
        weights = weights.clamp_min(0)
        if not torch.isfinite(weights.sum()):  # finite weights whose sum overflows float32
            weights = weights / weights.max()
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        idx = torch.multinomial(weights, n, replacement=True, generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "data": None if self.data is None else dict(self.data)}

    def load_state_dict(self, state: dict) -> int:
        """Restore a state_dict(); rows with a non-finite value (possible in a state saved before the
        buffer refused them) are dropped. Returns how many were dropped."""
        absent = [k for k in ("capacity", "data") if k not in state]
        absent += [f"data.{k}" for k in FIELDS if state.get("data") is not None and k not in state["data"]]
        if absent:
            raise ValueError(f"not a replay buffer state: no {absent} (expected ReplayBuffer.state_dict())")
        self.capacity = state["capacity"]
        if state["data"] is None:
            self.data = None
            return 0
        data = {k: state["data"][k] for k in FIELDS}
        keep = _finite_rows(data)
        if keep.all():
            self.data = {k: v.clone() for k, v in data.items()}
        else:
            self.data = {k: v[keep] for k, v in data.items()} if keep.any() else None  # indexing copies
        return int(keep.numel() - keep.sum())


def _finite_rows(batch: dict) -> torch.Tensor:
    """(B,) bool: the rows whose floating-point fields are all finite."""
    keep = torch.ones(batch["variance"].shape[0], dtype=torch.bool)
    for v in batch.values():
        if v.is_floating_point():
            keep &= torch.isfinite(v.flatten(1) if v.dim() > 1 else v[:, None]).all(1)
    return keep
