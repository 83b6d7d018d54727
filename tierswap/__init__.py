"""tierswap: a Linux swap device served from user space,
with virtual swap slots over tiered storage."""
