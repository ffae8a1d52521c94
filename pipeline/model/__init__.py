"""What the method is: the frozen CLIP backbone and its spatial tokens (`backbone`, `weights`,
`recalibrate`, `build`), the two projectors (`heads`), the losses (ASL, MFI: `losses`), the training
objective and InfoCLIP (`objective`, `infoclip`, `information`) and the projectors file
(`projectors`).

May import `data`, `config`, `errors`, `files`. No file layout of stores, no training loop.
"""
