import { assertEquals } from "../tests/assert.ts";
import { appendExtent, extentDescription, formatMap, formatTotals, type MapEntry } from "./map.ts";

const MAP: MapEntry[] = [
  { offset: 0, length: 1048576, type: 3 },
  { offset: 1048576, length: 65536, type: 0 },
  { offset: 1114112, length: 3080192, type: 3 },
];

Deno.test("appendExtent() merges neighbours of the same type only", () => {
  const entries: MapEntry[] = [];
  appendExtent(entries, { offset: 0, length: 512, type: 3 });
  appendExtent(entries, { offset: 512, length: 512, type: 3 });
  appendExtent(entries, { offset: 1024, length: 100, type: 0 });
  appendExtent(entries, { offset: 1124, length: 4, type: 3 });
  assertEquals(entries, [
    { offset: 0, length: 1024, type: 3 },
    { offset: 1024, length: 100, type: 0 },
    { offset: 1124, length: 4, type: 3 },
  ]);
});

Deno.test("extentDescription() knows base:allocation and qemu's contexts", () => {
  assertEquals(extentDescription("base:allocation", 0), "data");
  assertEquals(extentDescription("base:allocation", 3), "hole,zero");
  assertEquals(extentDescription("base:allocation", 4), undefined);
  assertEquals(extentDescription("qemu:dirty-bitmap:b0", 1), "dirty");
  assertEquals(extentDescription("qemu:allocation-depth", 0), "absent");
  assertEquals(extentDescription("qemu:allocation-depth", 1), "local");
  assertEquals(extentDescription("qemu:allocation-depth", 3), "backing depth 3");
  assertEquals(extentDescription("x-private:thing", 1), undefined);
});

Deno.test("formatMap() prints nbdinfo's columns and JSON objects", () => {
  assertEquals(
    formatMap(MAP, "base:allocation", false),
    "         0     1048576    3  hole,zero\n" +
      "   1048576       65536    0  data\n" +
      "   1114112     3080192    3  hole,zero\n",
  );
  const json = JSON.parse(formatMap(MAP, "base:allocation", true));
  assertEquals(json[1], { offset: 1048576, length: 65536, type: 0, description: "data" });
  assertEquals(
    formatMap([{ offset: 0, length: 5, type: 9 }], "x:y", false),
    "         0           5    9\n",
  );
  assertEquals(JSON.parse(formatMap([], "base:allocation", true)), []);
});

Deno.test("formatTotals() sums bytes per type in type order with percentages", () => {
  assertEquals(
    formatTotals(MAP, 4194304, "base:allocation", false),
    "     65536   1.6%   0 data\n   4128768  98.4%   3 hole,zero\n",
  );
  const json = JSON.parse(formatTotals(MAP, 4194304, "base:allocation", true));
  assertEquals(json, [
    { size: 65536, percent: 1.5625, type: 0, description: "data" },
    { size: 4128768, percent: 98.4375, type: 3, description: "hole,zero" },
  ]);
  const third = JSON.parse(formatTotals([{ offset: 0, length: 1, type: 0 }], 3, "x:y", true));
  assertEquals(third, [{ size: 1, percent: 33.3333, type: 0 }]);
  assertEquals(formatTotals([], 0, "base:allocation", false), "");
});
