"""The DINO transformer: deformable encoder (plain and saliency-selected), denoising queries, decoder and heads."""
