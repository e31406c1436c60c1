"""``rmt-predict``: offline inference over many images into Parquet, on one machine or on Ray Data."""
