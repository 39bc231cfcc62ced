from train_lrm import ShardRows
