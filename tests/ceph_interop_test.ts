/**
 * The rbd and s3 plugins against a real, throwaway Ceph cluster
 * (tests/ceph_cluster.ts): one cluster, started once, serves every step.
 *
 * @module
 */

import { assertEquals } from "./assert.ts";
import { INTEROP_REQUIRED } from "./helpers.ts";
import { missingCephCommands, startCephCluster } from "./ceph_cluster.ts";

const missing = missingCephCommands(true);
if (missing.length > 0 && !INTEROP_REQUIRED) {
  console.error(
    `\n*** SKIPPING Ceph tests: missing ${
      missing.join(", ")
    } (set NBD_INTEROP=require to fail) ***\n`,
  );
}

Deno.test({
  name: "ceph: rbd and s3 against a single-node cluster",
  ignore: missing.length > 0 && !INTEROP_REQUIRED,
  async fn(t) {
    await using cluster = await startCephCluster({ rgw: true });

    await t.step("the cluster takes an image", async () => {
      await cluster.rbd("create", "--size", "8M", "rbd/smoke");
      const info = JSON.parse(await cluster.rbd("info", "--format", "json", "rbd/smoke"));
      assertEquals(info.size, 8 << 20);
    });
  },
});
