"""Replay buffer for VELR's online LRM alignment.

Follows "VELR: Efficient Video Reward Feedback via Ensemble Latent Reward Models" (OpenReview
TctJWv7Suz; §4.3, Algorithm 1, App. C.2, C.6). During ReFL the latent reward model (LRM) drifts
away from the true pixel reward. Every ReFL step offers each latent it scored to this buffer
together with the ensemble variance the LRM had on it; the ones the buffer admits are decoded (no
gradient), scored by the pixel reward model and stored; every few steps the LRM is re-fitted on
samples drawn from the buffer (train_refl.py). An entry is (z0, text context, text length, true
reward, ensemble variance), and in an image-to-video run the conditioning an LRM may rescore it
with (the image latent; Wan 2.1 I2V: also the CLIP features). `ReplayBuffer` keeps, for an
ensemble, the samples it is least sure about ("variance", the paper's, C.2) and, for a one-member
LRM, the newest ("fifo"); `admit` says before any pixel reward is computed which candidates it
would keep, so only those are labelled.
Under several ranks the buffer is shared: every rank takes the same decisions on all ranks'
candidates and holds the same entries (see the class).

Left out: staleness-based eviction and the alignment schedule itself (that is train_refl.py's).
"""

import torch

FIELDS = ("z", "context", "lengths", "reward", "variance")
POLICIES = ("variance", "fifo")


class ReplayBuffer:
    """The buffer of (z0, context, lengths, reward, variance) entries, with one of two policies:

      "variance" (an ensemble, the paper's): the buffer keeps the samples the ensemble is least sure
        about. While not full every entry is kept; once full, a new entry replaces the entry of
        LOWEST variance, and only if its own variance is strictly higher ("we replace the samples
        with the smallest variance using those from the current batch", C.2). Among entries of equal
        variance the newest is the one replaced. Sampling draws entries with probability
        proportional to their variance (uniformly while all variances are zero).
      "fifo" (a one-member LRM, e.g. the Dollar baseline, whose variance is always 0 and would let
        nothing into a full buffer): once full, a new entry replaces the OLDEST entry; sampling is
        uniform. The stored variance is then only carried along.

    Both are one total order over entries (variance first, then age; or age alone for "fifo"): a
    full buffer always holds the `capacity` highest-ranked entries it was offered, so
    `admit(variances)` can say, before any pixel reward is computed, which candidates of a batch
    would be in the buffer after inserting the whole batch (candidates of one batch compete with
    each other as well as with the stored entries). Inserting only those candidates leaves the
    buffer holding the same entries as inserting all of them would; train_refl.py labels (decodes
    and scores) only the admitted ones.

    A row with a non-finite value in any field (a NaN reward, an inf variance, a NaN latent) is never
    stored: `insert`, `set_variance` and `load_state_dict` drop such rows and return how many they
    dropped; `admit` never admits a candidate with a non-finite variance.

    All tensors live on the CPU (a 480x832x81 latent is 8.4 MB in fp32; 256 of them plus their UMT5
    contexts are a few GB of host memory, never GPU memory). `state_dict()` / `load_state_dict()`
    save and restore the buffer with a training checkpoint, including each entry's arrival number.

    Several ranks (train_refl.py): the buffer is SHARED. Every rank all-gathers the candidates of all
    ranks (in rank order), takes the same admission decision and inserts the same entries in the
    same order, so all ranks hold identical buffers; sampling with a generator seeded identically on
    every rank then gives identical batches, and the LRM update is the same on every rank. We chose
    this over per-rank buffers because the LRM must stay identical across ranks (it defines every
    rank's loss), and a shared buffer sees the whole global batch; the cost is world_size times the
    insert traffic.
    """

    def __init__(self, capacity: int = 256, policy: str = "variance"):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.capacity, self.policy = capacity, policy
        self.data = None  # dict FIELDS -> tensor with a leading entry dimension, created on first insert
        self.arrival = torch.zeros(0, dtype=torch.int64)  # per entry: how many entries were stored before it
        self.count = 0  # entries ever stored (the next arrival number)

    def __len__(self) -> int:
        return 0 if self.data is None else self.data["variance"].shape[0]

    # ------------------------------------------------------------------ the order

    def _key(self, variance: float, arrival: int) -> tuple:
        """Rank of an entry: the larger key is kept. Variance first (the older wins a tie), or age alone
        (the newer is kept)."""
        return (arrival,) if self.policy == "fifo" else (variance, -arrival)

    def _lowest(self) -> int:
        """Index of the entry a full buffer replaces next."""
        keys = [self._key(v, a) for v, a in zip(self.data["variance"].tolist(), self.arrival.tolist())]
        return min(range(len(keys)), key=keys.__getitem__)

    def admit(self, variance: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which of B candidates (with these ensemble variances, offered in this order)
        would be in the buffer after inserting all of them. A candidate that would enter and then be
        replaced by a later one of the same batch is not admitted; nor is a non-finite variance."""
        variance = variance.detach().float().cpu().flatten()
        ok = torch.isfinite(variance)
        free = self.capacity - len(self)
        stored = ([] if self.data is None else
                  [(self._key(v, a), -1) for v, a in zip(self.data["variance"].tolist(), self.arrival.tolist())])
        cand = [(self._key(v, self.count + i), i) for i, v in enumerate(variance.tolist()) if ok[i]]
        if len(cand) <= free:
            kept = cand
        else:  # the buffer ends with the `capacity` highest-ranked of stored + candidates
            kept = sorted(stored + cand, key=lambda e: e[0], reverse=True)[: self.capacity]
        mask = torch.zeros(variance.numel(), dtype=torch.bool)
        for _, i in kept:
            if i >= 0:
                mask[i] = True
        return mask

    # ------------------------------------------------------------------ writing

    def insert(self, z, context, lengths, reward, variance, extra: dict | None = None) -> int:
        """Insert a batch in order: z (B, 16, T, H, W), context (B, L, C), lengths (B,), reward (B,),
        variance (B,), and `extra` fields (name -> (B, ...), e.g. an image-to-video run's conditioning),
        the same names in every insert. Rows with a non-finite value in any field are dropped;
        returns how many were dropped."""
        batch = {**dict(zip(FIELDS, (z, context, lengths, reward, variance))), **(extra or {})}
        if self.data is not None and set(batch) != set(self.data):
            raise ValueError(f"the buffer holds fields {sorted(self.data)}, this batch has {sorted(batch)}")
        batch = {k: v.detach().to("cpu") for k, v in batch.items()}
        sizes = {k: v.shape[0] for k, v in batch.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all fields need the same batch size, got {sizes}")
        keep = _finite_rows(batch)
        for i in keep.nonzero().flatten().tolist():
            self._insert_one({k: v[i : i + 1] for k, v in batch.items()})
        return int(keep.numel() - keep.sum())

    def _insert_one(self, entry: dict):
        stamp = torch.tensor([self.count], dtype=torch.int64)
        if self.data is None:
            self.data = {k: v.clone() for k, v in entry.items()}
            self.arrival = stamp
        elif len(self) < self.capacity:
            self.data = {k: torch.cat([self.data[k], entry[k]]) for k in self.data}
            self.arrival = torch.cat([self.arrival, stamp])
        else:
            j = self._lowest()
            new = self._key(entry["variance"].item(), self.count)
            if new <= self._key(self.data["variance"][j].item(), int(self.arrival[j])):
                return  # ranks below every stored entry: not stored, no arrival number used
            for k in self.data:
                self.data[k][j] = entry[k][0]
            self.arrival[j] = self.count
        self.count += 1

    def set_variance(self, variance: torch.Tensor) -> int:
        """Replace every entry's stored variance (e.g. rescored by the current LRM); entries whose
        new variance is not finite are removed. Returns how many were removed."""
        if len(self) == 0:
            return 0
        variance = variance.detach().to("cpu", self.data["variance"].dtype).flatten()
        if variance.shape[0] != len(self):
            raise ValueError(f"need one variance per entry ({len(self)}), got {variance.shape[0]}")
        self.data["variance"] = variance.clone()
        keep = torch.isfinite(variance)
        if not keep.all():
            self.data = {k: v[keep] for k, v in self.data.items()} if keep.any() else None
            self.arrival = self.arrival[keep]
        return int(keep.numel() - keep.sum())

    # ------------------------------------------------------------------ reading

    def sample(self, n: int, generator=None) -> dict:
        """n entries drawn with replacement -> dict of tensors: P(entry) proportional to its
        variance ("variance"), uniform ("fifo")."""
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
        if self.policy == "fifo" or weights.sum() <= 0:
            weights = torch.ones_like(weights)
        idx = torch.multinomial(weights, n, replacement=True, generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "policy": self.policy, "count": self.count, "arrival": self.arrival.clone(),
                "data": None if self.data is None else dict(self.data)}

    def load_state_dict(self, state: dict) -> int:
        """Restore a state_dict(); rows with a non-finite value (possible in a state saved before the
        buffer refused them) are dropped. A state saved before entries carried an arrival number gets
        them in storage order. Returns how many rows were dropped."""
        absent = [k for k in ("capacity", "data") if k not in state]
        absent += [f"data.{k}" for k in FIELDS if state.get("data") is not None and k not in state["data"]]
        if absent:
            raise ValueError(f"not a replay buffer state: no {absent} (expected ReplayBuffer.state_dict())")
        policy = state.get("policy", "variance")
        if policy != self.policy:
            raise ValueError(f"the saved replay buffer uses policy {policy!r}, this one {self.policy!r} "
                             f"(an ensemble LRM gives 'variance', a one-member LRM 'fifo')")
        self.capacity = state["capacity"]
        if state["data"] is None:
            self.data, self.arrival, self.count = None, torch.zeros(0, dtype=torch.int64), state.get("count", 0)
            return 0
        data = dict(state["data"])  # FIELDS, and any extra fields the run stored
        n = data["variance"].shape[0]
        arrival = state.get("arrival")
        arrival = torch.arange(n, dtype=torch.int64) if arrival is None else arrival.to(torch.int64)
        self.count = state.get("count", n)
        keep = _finite_rows(data)
        if keep.all():
            self.data, self.arrival = {k: v.clone() for k, v in data.items()}, arrival.clone()
        else:  # indexing copies
            self.data = {k: v[keep] for k, v in data.items()} if keep.any() else None
            self.arrival = arrival[keep]
        return int(keep.numel() - keep.sum())


def _finite_rows(batch: dict) -> torch.Tensor:
    """(B,) bool: the rows whose floating-point fields are all finite."""
    keep = torch.ones(batch["variance"].shape[0], dtype=torch.bool)
    for v in batch.values():
        if v.is_floating_point():
            keep &= torch.isfinite(v.flatten(1) if v.dim() > 1 else v[:, None]).all(1)
    return keep
