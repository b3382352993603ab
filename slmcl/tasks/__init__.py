"""What a task is: data files read row by row, prompt rendering, answer normalization, and the task
kinds (one file each, in `kinds/`) that score a row. No torch.
"""
