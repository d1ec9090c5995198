"""How latent replay stores a latent map, and what storing it costs in bytes.

A codec turns latents (N, C) or (N, C, H, W) into the tensor a memory keeps and back.
`Float16Codec` keeps the latents as float16; `ProductQuantizer` keeps, for the
C-dimensional vector at each spatial location, M codes of `bits` bits (faiss's product
quantizer), as REMIND does (Hayes et al., ECCV 2020, sec. 3.2: one codebook shared by
the 7 x 7 locations of a ResNet-18 feature map, 32 sub-quantizers of 256 centroids).
A sample's codes are bit-packed across its locations, so bits that do not fill a byte
(2 x 5 bits a location) are not rounded up per location; at 8 bits this is REMIND's
layout, one byte a code.
"""

from __future__ import annotations

import numpy as np
import torch

# faiss trains each sub-quantizer on at most this many vectors per centroid and samples
# the rest away; sampling them here bounds the memory a large base experience needs.
MAX_POINTS_PER_CENTROID = 256


def to_vectors(latents: torch.Tensor) -> np.ndarray:
    """(N, C, *spatial) -> (N * locations, C) float32, one row per spatial location."""
    channels = latents.shape[1]
    return latents.detach().movedim(1, -1).reshape(-1, channels).float().cpu().numpy()


def from_vectors(vectors: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `to_vectors` for latents of shape (C, *spatial)."""
    channels, spatial = shape[0], shape[1:]
    return torch.from_numpy(vectors).reshape(-1, *spatial, channels).movedim(-1, 1)


class Float16Codec:
    """Latents as float16: 2 bytes a value, nothing to learn."""

    codebook_bytes = 0
    fitted = True

    def __init__(self, latent_shape: tuple[int, ...]) -> None:
        self.latent_shape = latent_shape

    def code_bytes(self) -> int:
        return 2 * int(np.prod(self.latent_shape))

    def fit(self, vectors: np.ndarray) -> None:
        """Nothing to learn."""

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.detach().to("cpu", torch.float16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class ProductQuantizer:
    """faiss's product quantizer on each location's C-vector, its codebook held as float16.

    The vector is cut into M sub-vectors of C / M values, and each is replaced by the index
    of its nearest of 2**bits centroids; a sample costs ceil(locations * M * bits / 8)
    bytes, the codebook C * 2**bits float16 values. After training, the centroids are rounded to
    float16 and written back, so codes are computed against the codebook that is stored.
    """

    def __init__(self, latent_shape: tuple[int, ...], subquantizers: int, bits: int) -> None:
        import faiss

        # torch and faiss each with a thread per core oversubscribe the cores and slow every step
        # (their OpenMP pools spin against each other); faiss's calls here are small.
        faiss.omp_set_num_threads(1)
        self.latent_shape = latent_shape
        self.pq = faiss.ProductQuantizer(latent_shape[0], subquantizers, bits)
        self.codebook: torch.Tensor | None = None  # (M, 2**bits, C / M) float16, once fitted

    @property
    def fitted(self) -> bool:
        return self.codebook is not None

    @property
    def locations(self) -> int:
        return int(np.prod(self.latent_shape[1:]))

    @property
    def codebook_bytes(self) -> int:
        return 2 * self.pq.M * self.pq.ksub * self.pq.dsub

    def code_bytes(self) -> int:
        return (self.locations * self.pq.M * self.pq.nbits + 7) // 8

    def fit(self, vectors: np.ndarray) -> None:
        """Train the codebook on (n, C) vectors; torch's RNG draws faiss's k-means seed."""
        import faiss

        self.pq.cp.seed = int(torch.randint(2**31 - 1, ()))
        self.pq.train(np.ascontiguousarray(vectors, dtype=np.float32))
        centroids = faiss.vector_to_array(self.pq.centroids).astype(np.float16)
        self._set_codebook(centroids)

    def _set_codebook(self, centroids: np.ndarray) -> None:
        import faiss

        faiss.copy_array_to_vector(centroids.astype(np.float32), self.pq.centroids)
        self.codebook = torch.from_numpy(centroids.reshape(self.pq.M, self.pq.ksub, -1))

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, code_bytes) uint8: every location's M codes, packed."""
        import faiss

        pq = self.pq
        per_location = faiss.unpack_bitstrings(
            pq.compute_codes(to_vectors(latents)), pq.M, pq.nbits
        )
        return torch.from_numpy(
            faiss.pack_bitstrings(per_location.reshape(len(latents), -1), pq.nbits)
        )

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        import faiss

        pq = self.pq
        per_sample = faiss.unpack_bitstrings(codes.cpu().numpy(), self.locations * pq.M, pq.nbits)
        per_location = faiss.pack_bitstrings(per_sample.reshape(-1, pq.M), pq.nbits)
        return from_vectors(pq.decode(per_location), self.latent_shape)

    def state_dict(self) -> dict:
        return {"codebook": None if self.codebook is None else self.codebook.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["codebook"] is not None:
            self._set_codebook(state["codebook"].numpy().reshape(-1))
