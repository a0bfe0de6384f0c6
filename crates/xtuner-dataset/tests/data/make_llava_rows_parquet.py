"""Writes llava_rows.parquet, the Parquet fixture of src/reader.rs's tests.

Made with pyarrow (26.0.1) the way `datasets.Dataset.to_parquet` writes files: snappy
compression, dictionary-encoded strings, nested `list<struct>` columns. Two row groups,
so that row numbers must carry across groups. Run: python make_llava_rows_parquet.py
"""

import pyarrow as pa
import pyarrow.parquet as pq

turn = pa.struct([("from", pa.string()), ("value", pa.string())])
schema = pa.schema(
    [
        ("id", pa.int64()),
        ("image", pa.string()),
        ("conversations", pa.list_(turn)),
        ("input_ids", pa.list_(pa.int64())),
        ("score", pa.float64()),
        ("ok", pa.bool_()),
    ]
)
rows = [
    {
        "id": 1,
        "image": "coco/0001.jpg",
        "conversations": [
            {"from": "human", "value": "What is in the picture?\n<image>"},
            {"from": "gpt", "value": "Two cats on a sofa."},
        ],
        "input_ids": [1, 2, 3],
        "score": 0.5,
        "ok": True,
    },
    {
        "id": 2,
        "image": None,
        "conversations": [
            {"from": "human", "value": "Say hi."},
            {"from": "gpt", "value": "Hi!"},
            {"from": "human", "value": "Again, in Chinese."},
            {"from": "gpt", "value": "你好！"},
        ],
        "input_ids": [],
        "score": None,
        "ok": False,
    },
    {
        "id": 3,
        "image": "coco/0003.jpg",
        "conversations": [],
        "input_ids": None,
        "score": -1.25,
        "ok": None,
    },
]
table = pa.Table.from_pylist(rows, schema=schema)
pq.write_table(table, "llava_rows.parquet", row_group_size=2, compression="snappy")
