/**
 * Fixtures shared by the view's tests.
 *
 * @module
 */

/** A log as the log filter writes it: two connections, one second apart. */
export const SAMPLE_LOG = [
  "some earlier text in an appended file",
  '2026-01-02T03:04:05.000000Z connection=1 Open export="" tls=0 readonly=0 size=1048576 write=1',
  "2026-01-02T03:04:05.000100Z connection=1 Write id=1 offset=4096 count=8192 fua=0 elapsed=0.000050 return=0",
  "2026-01-02T03:04:05.000200Z connection=1 Read id=2 offset=0 count=512 elapsed=0.002000 return=0",
  '2026-01-02T03:04:05.500000Z connection=1 Read id=3 offset=2000000 count=512 elapsed=0.000010 return=EINVAL error="out of range"',
  "2026-01-02T03:04:05.600000Z connection=1 Flush id=4 elapsed=0.000010 return=0",
  "2026-01-02T03:04:05.700000Z connection=1 Close transactions=4",
  '2026-01-02T03:04:06.000000Z connection=2 Open export="" tls=1 readonly=0 size=1048576 write=1',
  "2026-01-02T03:04:06.000000Z connection=2 Trim id=1 offset=65536 count=65536 fua=0 elapsed=0.000010 return=0",
  "2026-01-02T03:04:06.000000Z connection=2 Zero id=2 offset=0 count=4096 trim=1 fua=0 fast=0 elapsed=0.000010 return=0",
  "2026-01-02T03:04:06.000000Z connection=2 Frobnicate id=3",
];
