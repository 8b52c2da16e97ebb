"""TinyCNN on a microcontroller (lesson 09): plan, generate, cross-compile, emulate.

- ``planner``    tensor lifetimes, an arena planner (greedy by size, as TFLite Micro's),
                 flash/RAM budgets of a part
- ``model``      a network as a list of int8 layers in NHWC (from course_lib's integer
                 TinyCNN or from a ``.tflite`` file)
- ``codegen``    C source for a model: const weights, per-channel multipliers, a static arena
- ``toolchain``  cross-compile with ziglang for a Cortex-M4; ELF section sizes
- ``emulator``   run the ELF in unicorn as a Cortex-M4; count executed instructions
- ``tflm``       TensorFlow Lite Micro's Python interpreter: outputs and arena size; LiteRT
- ``harness``    compile and run one C function of the learner's on the emulated CPU

The C sources (start-up, int8 kernels, linker script) are in ``c/`` beside this file.
"""
