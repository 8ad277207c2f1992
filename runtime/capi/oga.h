/*
 * The part of onnxruntime-genai's C API (libonnxruntime-genai.so, MIT licensed) this library
 * calls. The wheel ships the library but no header; these prototypes follow upstream's
 * src/ort_genai_c.h (github.com/microsoft/onnxruntime-genai) and every name was checked against
 * the 0.18.0 wheel's exports (nm -D --defined-only). An OgaResult* return is NULL on success;
 * otherwise OgaResultGetError() holds the message and OgaDestroyResult() frees it.
 */
#ifndef LLMX_OGA_H
#define LLMX_OGA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct OgaResult OgaResult;
typedef struct OgaConfig OgaConfig;
typedef struct OgaModel OgaModel;
typedef struct OgaGeneratorParams OgaGeneratorParams;
typedef struct OgaGenerator OgaGenerator;
typedef struct OgaTensor OgaTensor;
typedef struct OgaTokenizer OgaTokenizer;
typedef struct OgaTokenizerStream OgaTokenizerStream;
typedef struct OgaSequences OgaSequences;

const char *OgaResultGetError(const OgaResult *result);
void OgaDestroyResult(OgaResult *result);
void OgaDestroyString(const char *s);
void OgaSetTelemetryEnabled(bool enabled);

OgaResult *OgaCreateConfig(const char *config_path, OgaConfig **out);
OgaResult *OgaConfigOverlay(OgaConfig *config, const char *json);
OgaResult *OgaConfigClearProviders(OgaConfig *config);
OgaResult *OgaConfigAppendProvider(OgaConfig *config, const char *provider);
void OgaDestroyConfig(OgaConfig *config);
OgaResult *OgaCreateModelFromConfig(const OgaConfig *config, OgaModel **out);
void OgaDestroyModel(OgaModel *model);

OgaResult *OgaCreateGeneratorParams(const OgaModel *model, OgaGeneratorParams **out);
OgaResult *OgaGeneratorParamsSetSearchNumber(OgaGeneratorParams *params, const char *name, double value);
void OgaDestroyGeneratorParams(OgaGeneratorParams *params);
OgaResult *OgaCreateGenerator(const OgaModel *model, const OgaGeneratorParams *params, OgaGenerator **out);
void OgaDestroyGenerator(OgaGenerator *generator);
/* Runs the model on the tokens (the prompt, then each kept token); the logits of the last
 * position are then read with OgaGenerator_GetLogits, shape (batch, 1, vocab), float32. */
OgaResult *OgaGenerator_AppendTokens(OgaGenerator *generator, const int32_t *input_ids, size_t count);
OgaResult *OgaGenerator_GetLogits(OgaGenerator *generator, OgaTensor **out);
OgaResult *OgaTensorGetData(OgaTensor *tensor, void **out);
void OgaDestroyTensor(OgaTensor *tensor);

OgaResult *OgaCreateTokenizer(const OgaModel *model, OgaTokenizer **out);
void OgaDestroyTokenizer(OgaTokenizer *tokenizer);
OgaResult *OgaCreateSequences(OgaSequences **out);
void OgaDestroySequences(OgaSequences *sequences);
size_t OgaSequencesGetSequenceCount(const OgaSequences *sequences, size_t index);
const int32_t *OgaSequencesGetSequenceData(const OgaSequences *sequences, size_t index);
OgaResult *OgaTokenizerEncode(const OgaTokenizer *tokenizer, const char *text, OgaSequences *sequences);
/* *out is freed with OgaDestroyString. */
OgaResult *OgaTokenizerDecode(const OgaTokenizer *tokenizer, const int32_t *tokens, size_t count, const char **out);
OgaResult *OgaCreateTokenizerStream(const OgaTokenizer *tokenizer, OgaTokenizerStream **out);
void OgaDestroyTokenizerStream(OgaTokenizerStream *stream);
/* *out is the stream's, valid until its next call. */
OgaResult *OgaTokenizerStreamDecode(OgaTokenizerStream *stream, int32_t token, const char **out);

#endif /* LLMX_OGA_H */
