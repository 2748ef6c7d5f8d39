-- 0008: a stream entry id is two unsigned 64-bit numbers (Redis accepts any up to 2^64-1 given
-- explicitly to XADD, and once one such entry is in a stream every later auto id is above it).
-- bigint holds only half of that range, so receipts keep both parts as numeric(20,0), which holds
-- them all and orders them the same way.

ALTER TABLE stream_receipts
    ALTER COLUMN ms TYPE numeric(20, 0),
    ALTER COLUMN seq TYPE numeric(20, 0);
