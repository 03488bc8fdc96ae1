"""Lightning callbacks: clipping, the non-finite step guard, the optimizer monitor, schedule-free mode."""
